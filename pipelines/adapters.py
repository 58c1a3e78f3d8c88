"""BOFT adapters on a diffusers pipeline: the LoRA-style lifecycle, control heads and identifier
embeddings while sampling, saving with the model, and merged export.

`BOFTAdaptersMixin` goes before a diffusers pipeline class (`BOFTPipeline` for SD 1.x/2.x,
`BOFTStableDiffusionXLPipeline` for SDXL). It keeps no adapter state of its own: everything
lives in the UNet's registry (`boft_diffusion.adapter`), so `pipe.unet = torch.compile(pipe.unet)`,
`copy.deepcopy(pipe.unet)` and `.to()` cannot lose an adapter, and library calls on `pipe.unet`
and pipeline calls always agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import boft_diffusion
from boft_diffusion import unet as lifecycle
from boft_diffusion.attention import boft_linears
from boft_diffusion.config import BOFTConfig
from boft_diffusion.control import control_residual, set_residual
from boft_diffusion.files import atomic_write
from boft_diffusion.identifier import attach_identifier, detach_identifier

from .control_image import control_tensor
from .families import check_family

logger = logging.getLogger(__name__)

ADAPTERS_FOLDER = "boft_adapters"  # beside the model's components in save_pretrained
STATE_FILE = "adapters.json"


class BOFTAdaptersMixin:
    """The BOFT verbs of a pipeline; names follow diffusers' LoRA API where one exists."""

    fuse_for_sampling = True  # sample with merged weights: no BOFT cost per denoising step
    plain_pipeline_class: type  # the stock diffusers class export_merged writes for
    family: str  # "sd" or "sdxl" (families.py)

    # ------------------------------------------------------------------ lifecycle
    def load_boft(
        self,
        path_or_hub_id: str | os.PathLike,
        adapter_name: str = "default",
        subfolder: str | None = None,
        revision: str | None = None,
    ) -> BOFTConfig:
        """Install an adapter (ours or PEFT's BOFT; a folder or a hub repo id) with its control head
        and identifier embeddings, as `adapter_name`, active. Everything is checked against this
        pipeline's models first; an adapter for another model raises and changes nothing."""
        config = boft_diffusion.load_boft(
            self.unet, path_or_hub_id, adapter_name, subfolder=subfolder, revision=revision,
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, vae_scale_factor=self.vae_scale_factor,
        )
        for _, rotation in lifecycle.rotations(self.unet, adapter_name):
            rotation.boft_skew.requires_grad_(False)  # loaded for inference: sampling stays fused
        return config

    def save_boft(self, save_directory: str | os.PathLike, adapter_name: str | None = None, **kwargs) -> Path:
        """Write one adapter as a unit (weights, config, control head, identifier embeddings, model
        card); `push_to_hub=True, repo_id=...` uploads it. Keywords go to `boft_diffusion.save_boft`."""
        base = kwargs.pop("base_model", None) or self.name_or_path or None
        return boft_diffusion.save_boft(self.unet, save_directory, adapter_name, base_model=base, **kwargs)

    @property
    def boft_adapters(self) -> list[str]:
        """Names of the installed BOFT adapters."""
        return lifecycle.adapter_names(self.unet) if self.unet is not None else []

    def get_boft_adapter(self, adapter_name: str | None = None) -> boft_diffusion.BOFTAdapter:
        return lifecycle.get_adapter(self.unet, adapter_name)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None, control_scales=None) -> None:
        """Which BOFT adapters apply, composed in this order (R = R_first R_second ...); [] applies none.
        `control_scales`: one per name (None keeps that adapter's scale), for adapters with a control head.

        Names that are not BOFT adapters are passed on to diffusers' LoRA `set_adapters`.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        boft = set(self.boft_adapters)
        if not names and not boft:
            return
        if not boft or (names and not set(names) & boft):
            return super().set_adapters(adapter_names, adapter_weights)
        if not set(names) <= boft:
            raise ValueError(f"Adapters {sorted(set(names) - boft)} are not BOFT adapters {sorted(boft)}; "
                             "set BOFT and LoRA adapters in separate calls.")
        if adapter_weights is not None:
            raise ValueError("BOFT adapters take no weights; use set_active_factors (fractional k) to weaken one.")
        if control_scales is not None:
            if not isinstance(control_scales, (list, tuple)) or len(control_scales) != len(names):
                raise ValueError(f"control_scales needs one entry per adapter name {names}, got {control_scales!r}.")
            for name, scale in zip(names, control_scales):
                if scale is not None:
                    self.get_boft_adapter(name).control_scale = _scale(scale, f"control scale of {name!r}")
        lifecycle.set_active_adapters(self.unet, names)

    def get_active_adapters(self) -> list[str]:
        """Active adapters: the BOFT ones (in composition order), then diffusers' LoRA ones."""
        active = lifecycle.get_active_adapters(self.unet)
        if getattr(self.unet, "peft_config", None):
            active += super().get_active_adapters()
        return active

    def disable_boft(self) -> None:
        """The base model (plus LoRA, if any); the adapters and their settings stay for enable_boft."""
        lifecycle.set_boft_enabled(self.unet, False)

    def enable_boft(self) -> None:
        lifecycle.set_boft_enabled(self.unet, True)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Delete adapters by name, BOFT (rotations, control head, identifier) or LoRA."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        boft = [n for n in names if n in self.boft_adapters]
        others = [n for n in names if n not in boft]
        lora = set(getattr(lifecycle.base_module(self.unet), "peft_config", None) or ())
        unknown = [n for n in others if n not in lora]
        if unknown:
            raise ValueError(f"No BOFT adapter named {unknown}; BOFT adapters: {self.boft_adapters}, "
                             f"LoRA adapters: {sorted(lora)}. Nothing was deleted.")
        if boft:
            lifecycle.delete_adapters(self.unet, boft)
        if others:
            super().delete_adapters(others)

    def unload_boft(self) -> None:
        """Remove every BOFT adapter: the UNet's original modules are back, bit for bit."""
        lifecycle.unload_boft(self.unet)

    def set_active_factors(
        self, k: float | None = None, adapter_name: str | None = None, mask: Sequence[bool] | None = None
    ) -> None:
        """Keep butterfly factors 0..k-1 of an adapter (or those in a boolean `mask`), the rest act as
        identity; a fractional k fades the next factor in as a rotation. k = 0 leaves the base model
        plus the control head and the learned scale s. A fused pipeline re-fuses in place."""
        lifecycle.set_active_factors(self.unet, k, adapter_name=adapter_name, mask=mask)

    def active_factors(self, adapter_name: str | None = None) -> list[bool]:
        return lifecycle.active_factors(self.unet, adapter_name)

    # ------------------------------------------------------------------ fusing
    @property
    def is_fused(self) -> bool:
        return lifecycle.is_fused(self.unet)

    def fuse(self) -> None:
        """Merge W' = diag(s) W R^T of the active adapters; the base weights stay for `unfuse`."""
        lifecycle.fuse_boft(self.unet)

    def unfuse(self) -> None:
        """Rotate on the fly again (as in training); exact, the base weights were never changed."""
        lifecycle.unfuse_boft(self.unet)

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """diffusers' q/k/v fusion reads the raw projection weights, which would drop the adapters:
        refused while BOFT adapters rotate q/k/v, before anything changes."""
        if unet and any(path.endswith((".to_q", ".to_k", ".to_v")) for path, _ in boft_linears(lifecycle.base_module(self.unet))):
            raise ValueError(
                "fuse_qkv_projections would merge the base q/k/v weights and drop the BOFT adapters. Sampling "
                "already uses fused BOFT weights (pipe.fuse()); or call fuse_qkv_projections(unet=False), or unload_boft()."
            )
        super().fuse_qkv_projections(unet=unet, vae=vae)

    @contextlib.contextmanager
    def _sampling_weights(self):
        """Fuse for sampling when `fuse_for_sampling`. A fuse made here for adapters being trained
        (skews requiring grad, as after add_boft; load_boft freezes them) is undone afterwards, so a
        trainer's validation samples fused, like a reload, and training goes on unfused."""
        fuse_here = self.fuse_for_sampling and not self.is_fused and bool(self.boft_adapters)
        if fuse_here:
            self.fuse()
        try:
            yield
        finally:
            if fuse_here and any(r.boft_skew.requires_grad for n in self.boft_adapters
                                 for _, r in lifecycle.rotations(self.unet, n)):
                self.unfuse()

    # ------------------------------------------------------------------ control heads
    @property
    def control_head(self):
        """The control head of the one active adapter that has one (None without); several active
        control adapters are reached through `get_boft_adapter(name).control_head`."""
        heads = self._control_adapters()
        return self.get_boft_adapter(heads[0]).control_head if len(heads) == 1 else None

    def attach_control_head(self, head, adapter_name: str | None = None) -> None:
        """Give an adapter a control head (a trainer's head being trained, or one built by hand)."""
        if head is not None:
            _check_head(head, self.unet, self.vae_scale_factor, "the control head")
        self.get_boft_adapter(adapter_name).control_head = head

    def _control_adapters(self) -> list[str]:
        """Active adapters with a control head, in composition order."""
        if self.unet is None:
            return []
        return [n for n in lifecycle.get_active_adapters(self.unet) if self.get_boft_adapter(n).control_head is not None]

    def _control_residuals(self, control_image, control_scale, batch_size: int, num_images_per_prompt: int,
                           height: int, width: int, resample: str) -> dict[str, torch.Tensor]:
        """{adapter: scale * head(its control image)} for the active control adapters, each
        (batch_size * num_images_per_prompt, C, h, w); checks that images and adapters match."""
        names = self._control_adapters()
        if isinstance(control_image, dict):
            unknown = sorted(set(control_image) - set(names))
            if unknown:
                raise ValueError(
                    f"control_image has images for {unknown}, which are not active control adapters "
                    f"(active: {names}); activate them with set_adapters or drop those images."
                )
            images = control_image
        elif control_image is None:
            images = {}
        elif len(names) == 1:
            images = {names[0]: control_image}
        elif not names:
            raise ValueError(
                "control_image was given but no active adapter has a control head: load_boft an adapter "
                "folder with control_head/ (or attach_control_head), or drop control_image."
            )
        else:
            raise ValueError(
                f"Several control adapters are active ({names}): pass control_image as a dict "
                "{adapter name: image}, one image for each."
            )
        residuals = {}
        for name in names:
            adapter = self.get_boft_adapter(name)
            scale = adapter.control_scale * _call_scale(control_scale, name)
            if scale == 0:
                continue
            if name not in images:
                raise ValueError(
                    f"Adapter {name!r} has a control head: pass its control image (control_image=image, or "
                    f"{{{name!r}: image}} with several), or control_scale=0.0 to generate without control."
                )
            head = adapter.control_head
            head_param = next(head.parameters())
            image = control_tensor(images[name], head.config.conditioning_channels, height, width, resample)
            if image.shape[0] == 1:
                repeat = batch_size * num_images_per_prompt
            elif image.shape[0] == batch_size:
                repeat = num_images_per_prompt
            else:
                raise ValueError(f"Got {image.shape[0]} control images for {batch_size} prompts (adapter {name!r}); "
                                 "pass one, or one per prompt.")
            image = image.repeat_interleave(repeat, dim=0).to(self._execution_device, head_param.dtype)
            residuals[name] = head(image) * scale  # (B * n, conv_in channels, h, w)
        return residuals

    @contextlib.contextmanager
    def _boft_sampling(self, call: dict[str, Any], batch_size: int, height: int, width: int):
        """Around one sampling call: fused weights, identifier embeddings of the active adapters,
        and the control residual, switched per step for control_guidance_start/end (through
        callback_on_step_end, wrapping the caller's). Rewrites `call`'s callback entries.
        `self.control_in_effect` ({adapter: bool}) tells a step-end callback which controls acted."""
        num_images = call.get("num_images_per_prompt", 1)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images!r}.")
        residuals = self._control_residuals(
            call.pop("control_image"), call.pop("control_scale"), batch_size, num_images, height, width,
            call.pop("control_resample"),
        )
        start, end = call.pop("control_guidance_start"), call.pop("control_guidance_end")
        windows = {n: _window(start, end, n) for n in residuals}
        steps = len(call.get("timesteps") or call.get("sigmas") or ()) or call["num_inference_steps"]

        def residual_at(step: int) -> torch.Tensor | None:
            on = [r for n, r in residuals.items() if windows[n][0] <= step / steps and (step + 1) / steps <= windows[n][1]]
            self.control_in_effect = {n: windows[n][0] <= step / steps and (step + 1) / steps <= windows[n][1]
                                      for n in residuals}
            return sum(on[1:], on[0]) if on else None

        user_callback = call.get("callback_on_step_end")
        if residuals:
            tensor_inputs = getattr(user_callback, "tensor_inputs", None)
            if tensor_inputs is not None:
                call["callback_on_step_end_tensor_inputs"] = tensor_inputs

            def on_step_end(pipe, step, timestep, tensors):
                out = user_callback(pipe, step, timestep, tensors) if user_callback is not None else tensors
                set_residual(self.unet, residual_at(step + 1))
                return out

            call["callback_on_step_end"] = on_step_end
        identifiers = [self.get_boft_adapter(n).identifier for n in lifecycle.get_active_adapters(self.unet)]
        identifiers = [i for i in identifiers if i is not None]
        if identifiers:
            def swap(input_ids, embeds):
                for identifier in identifiers:
                    embeds = identifier(input_ids, embeds)
                return embeds

            attach_identifier(self.text_encoder, swap)
        control = control_residual(self.unet, residual_at(0)) if residuals else contextlib.nullcontext()
        try:
            with self._sampling_weights(), control:
                yield
        finally:
            if identifiers:
                detach_identifier(self.text_encoder)

    # ------------------------------------------------------------------ interpolation
    def interpolate(self, prompt: str, control_image=None, ks: Sequence[float] | None = None,
                    adapter_name: str | None = None, seed: int = 0, **kwargs: Any) -> list:
        """One image per number of active factors k (default m, m-1, ..., 0; fractions allowed), all
        from the same seed. Keywords go to `__call__`. The adapter's factors are restored afterwards."""
        if not isinstance(prompt, str) or kwargs.get("num_images_per_prompt", 1) != 1:
            raise ValueError("interpolate makes one image per k: pass a single prompt string and num_images_per_prompt=1.")
        if "generator" in kwargs:
            raise ValueError("interpolate seeds every image itself; pass seed=... instead of generator.")
        adapter = self.get_boft_adapter(adapter_name)
        name = lifecycle.require_adapter(self.unet, adapter_name)
        ks = list(range(adapter.n_factors, -1, -1)) if ks is None else list(ks)
        for k in ks:
            lifecycle.factor_scales(k, adapter.n_factors, name)  # every k checked before the first image
        previous = adapter.factor_scales
        images = []
        try:
            for k in ks:
                self.set_active_factors(k, adapter_name=name)
                generator = torch.Generator("cpu").manual_seed(seed)
                out = self(prompt, control_image=control_image, generator=generator, **kwargs)
                images.append((out.images if kwargs.get("return_dict", True) else out[0])[0])
        finally:
            lifecycle.set_factor_scales(self.unet, previous, name)
        return images

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """The base pipeline (the UNet's base weights, whatever is fused) plus every adapter under
        `boft_adapters/<name>/` and their state (active, factors, control scales), which
        `from_pretrained` of the folder restores."""
        super().save_pretrained(save_directory, *args, **kwargs)
        names = self.boft_adapters
        if not names:
            return
        root = Path(save_directory) / ADAPTERS_FOLDER
        for name in names:
            self.save_boft(root / name, name)
        found = lifecycle.adapters(self.unet)
        state = {
            "adapters": names,
            "active": list(lifecycle.registry(self.unet).active),
            "enabled": lifecycle.registry(self.unet).enabled,
            "factor_scales": {n: list(found[n].factor_scales) for n in names},
            "control_scales": {n: found[n].control_scale for n in names},
        }
        atomic_write(root / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=2) + "\n"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' from_pretrained, then the adapters a `save_pretrained` of this class wrote. A
        model of another family (SDXL for BOFTPipeline, SD3, Flux, ...) is refused by name first."""
        check_family(cls, pretrained_model_name_or_path, **kwargs)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        root = _saved_adapters(pretrained_model_name_or_path, kwargs.get("revision"))
        if root is not None:
            pipe._load_saved_adapters(root)
        return pipe

    def _load_saved_adapters(self, root: Path) -> None:
        try:
            state = json.loads((root / STATE_FILE).read_text())
            names = state["adapters"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{root / STATE_FILE} is missing or corrupt ({err}); load the adapters one by one "
                             f"with pipe.load_boft('{root}/NAME', adapter_name='NAME').") from err
        try:
            for name in names:
                self.load_boft(root / name, adapter_name=name)
                lifecycle.set_factor_scales(self.unet, state["factor_scales"][name], name)
                self.get_boft_adapter(name).control_scale = _scale(state["control_scales"][name], "control scale")
            lifecycle.set_active_adapters(self.unet, state["active"])
            lifecycle.set_boft_enabled(self.unet, state["enabled"])
        except BaseException:
            lifecycle.unload_boft(self.unet)  # never half: all adapters or none
            raise

    def _merged_unet(self):
        """A plain copy of the UNet class with the active adapters merged into its weights."""
        model = lifecycle.base_module(self.unet)
        fused = self.is_fused
        self.fuse()
        try:
            state = model.state_dict()
            for path, wrapper in boft_linears(model):
                state[f"{path}.weight"] = wrapper.boft_merged_weight
            plain = type(model).from_config(model.config).to(device=model.device, dtype=model.dtype)
            plain.load_state_dict(state)
        finally:
            if not fused:
                self.unfuse()
        return plain

    def export_merged(self, save_directory: str | os.PathLike, k: float | None = None,
                      adapter_name: str | None = None, **kwargs) -> Path:
        """Write a plain diffusers folder of this model with the active adapters merged (at k active
        factors of `adapter_name`, when given), which stock diffusers pipelines load. Identifier
        embeddings are written into the text encoder's embedding rows. Control heads cannot be part
        of a plain pipeline: their adapters' rotations are merged, the heads are left out (warned)."""
        names = lifecycle.get_active_adapters(self.unet)
        if not names:
            raise ValueError("No active BOFT adapter to merge; load_boft one or set_adapters first.")
        if self._control_adapters():
            logger.warning("Control heads of %s are not part of a plain pipeline; only their rotations are merged.",
                           self._control_adapters())
        adapter = name = None
        if k is not None:
            name = lifecycle.require_adapter(self.unet, adapter_name)
            adapter = self.get_boft_adapter(name)
            previous = adapter.factor_scales
            self.set_active_factors(k, adapter_name=name)
        try:
            plain_unet = self._merged_unet()
        finally:
            if adapter is not None:
                lifecycle.set_factor_scales(self.unet, previous, name)
        plain = self.plain_pipeline_class(**{**self.components, "unet": plain_unet})
        embeddings = self.text_encoder.get_input_embeddings().weight
        original = embeddings.detach().clone()
        identifiers = [self.get_boft_adapter(n).identifier for n in names]
        try:
            with torch.no_grad():
                for identifier in identifiers:
                    if identifier is not None:
                        embeddings[identifier.token_ids.to(embeddings.device)] = identifier.vectors.to(embeddings)
            plain.save_pretrained(save_directory, **kwargs)
        finally:
            with torch.no_grad():
                embeddings.copy_(original)
        return Path(save_directory)


def _saved_adapters(path, revision: str | None) -> Path | None:
    """The boft_adapters/ folder beside a saved pipeline (local, or in the hub snapshot); None without."""
    local = Path(path)
    if local.is_dir():
        root = local / ADAPTERS_FOLDER
        return root if root.is_dir() else None
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(str(path), revision=revision, allow_patterns=[f"{ADAPTERS_FOLDER}/**"]))
    except Exception as err:  # no network, no cache entry, gated repo: the pipeline itself loaded fine
        logger.info("No BOFT adapters fetched beside %s (%s).", path, type(err).__name__)
        return None
    root = snapshot / ADAPTERS_FOLDER
    return root if root.is_dir() else None


def _check_head(head, unet, vae_scale_factor: int, source) -> None:
    conv_in = lifecycle.base_module(unet).conv_in.out_channels
    if head.config.out_channels != conv_in or head.config.downscale_factor != vae_scale_factor:
        raise ValueError(
            f"Control head {source} was made for another model: it outputs {head.config.out_channels} channels "
            f"at 1/{head.config.downscale_factor} of the image size, this pipeline needs {conv_in} channels "
            f"(unet.conv_in) at 1/{vae_scale_factor} (the VAE's scale factor)."
        )


def _scale(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"The {what} must be a finite number, got {value!r}.")
    return float(value)


def _call_scale(control_scale, name: str) -> float:
    """The call's control_scale for one adapter: a number for all, or {adapter: number}."""
    if isinstance(control_scale, dict):
        return _scale(control_scale.get(name, 1.0), f"control_scale for {name!r}")
    return _scale(control_scale, "control_scale")


def _window(start, end, name: str) -> tuple[float, float]:
    """(start, end) fractions of the denoising steps where adapter `name`'s control acts."""
    s = _scale(start.get(name, 0.0) if isinstance(start, dict) else start, f"control_guidance_start for {name!r}")
    e = _scale(end.get(name, 1.0) if isinstance(end, dict) else end, f"control_guidance_end for {name!r}")
    if not 0.0 <= s < e <= 1.0:
        raise ValueError(f"control_guidance_start/end for {name!r} must satisfy 0 <= start < end <= 1, got {s}, {e}.")
    return s, e
