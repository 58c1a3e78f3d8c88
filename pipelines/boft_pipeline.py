"""BOFTPipeline: Stable Diffusion with BOFT adapters, an optional control head and factor interpolation.

A `StableDiffusionPipeline` subclass, so diffusers' own loop (check inputs, encode prompt,
timesteps, latents, denoise, decode) runs unchanged. What it adds:

- `load_boft(folder)` installs an adapter (ours or PEFT's) and, when the folder has a
  `control_head/` (the trainers' output layout), the control head as the optional component
  `control_head`;
- `__call__(prompt, control_image, ...)` runs the head once on the control image and lets
  every UNet call add its output after `conv_in`;
- sampling uses fused weights (W' = diag(s) W R^T written once; `set_active_factors` re-fuses
  from the kept base weights), `interpolate` sweeps the number of active butterfly factors;
- diffusers' xformers / attention-slicing switches keep the BOFT processors instead of
  silently replacing them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

import boft_diffusion
from boft_diffusion.attention import select_backend
from boft_diffusion.config import BOFTConfig
from boft_diffusion.control import ControlHead, control_residual
from boft_diffusion.identifier import (
    attach_identifier,
    detach_identifier,
    load_identifier_embeddings,
    save_identifier_embeddings,
)
from boft_diffusion.unet import adapter_names, boft_configs, boft_processors, require_adapter, rotations

logger = logging.getLogger(__name__)

CONTROL_HEAD_FOLDER = "control_head"
RESAMPLE = {"nearest": PIL.Image.NEAREST, "bilinear": PIL.Image.BILINEAR, "bicubic": PIL.Image.BICUBIC}


class BOFTPipeline(StableDiffusionPipeline):
    """Stable Diffusion + BOFT adapters + optional control head (`control_head`, a `ControlHead`).

    `from_pretrained` of a plain Stable Diffusion folder gives `control_head=None`; adapters are
    not pipeline components: add them with `load_boft` and save them with `save_boft`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->control_head->unet->vae"
    _optional_components = StableDiffusionPipeline._optional_components + ["control_head"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker = None,
        feature_extractor: CLIPImageProcessor = None,
        image_encoder: CLIPVisionModelWithProjection = None,
        control_head: ControlHead = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        if control_head is not None:
            self._check_control_head(control_head, "control_head")
        self.register_modules(control_head=control_head)
        # Sample with merged weights (no per-step BOFT cost); see `fuse`.
        self.fuse_for_sampling = True
        self._boft_backend = "auto"
        self._identifiers = {}  # adapter name -> IdentifierEmbeddings, applied while the adapter is active

    # ------------------------------------------------------------------ adapters and control head
    def load_boft(self, path: str | os.PathLike, adapter_name: str = "default") -> BOFTConfig:
        """Install the adapter in `path` (boft_config.json + boft_weights.safetensors, or PEFT's BOFT
        folder) as `adapter_name`, and its `control_head/` when present. Returns its BOFTConfig.

        Everything is validated before the pipeline changes: an adapter or head made for another
        model raises a ValueError and leaves the pipeline as it was.
        """
        identifier = load_identifier_embeddings(path, self.text_encoder, self.tokenizer)
        head = None
        head_folder = Path(path) / CONTROL_HEAD_FOLDER
        if head_folder.is_dir():
            head = ControlHead.from_pretrained(head_folder, torch_dtype=self.unet.dtype)
            self._check_control_head(head, head_folder)
        was_fused = self.is_fused
        self.unfuse()  # adapters are added to unfused weights; sampling fuses again
        try:
            config = boft_diffusion.load_boft(self.unet, path, adapter_name, backend=self._boft_backend)
        except BaseException:
            if was_fused:
                self.fuse()
            raise
        for _, rotation in rotations(self.unet, adapter_name):
            # Loaded for inference, so sampling keeps it fused. Only the skew: the library reads
            # boft_s.requires_grad as "s is trained" when saving.
            rotation.boft_skew.requires_grad_(False)
        if head is not None:
            if self.control_head is not None:
                logger.info("Replacing the loaded control head with %s.", head_folder)
            self.register_modules(control_head=head.to(self.unet.device).eval())
        self._identifiers.pop(adapter_name, None)
        if identifier is not None:
            self._identifiers[adapter_name] = identifier.to(self.text_encoder.device).requires_grad_(False)
        self._apply_identifiers()
        return config

    def _apply_identifiers(self) -> None:
        """Swap in the learned identifier embeddings of the active adapters (none: the base text encoder)."""
        active = [self._identifiers[n] for n in self._active_boft_adapters() if n in self._identifiers]
        if not active:
            detach_identifier(self.text_encoder)
            return

        def swap(input_ids, embeds):
            for identifier in active:
                embeds = identifier(input_ids, embeds)
            return embeds

        attach_identifier(self.text_encoder, swap)

    def _active_boft_adapters(self) -> list[str]:
        active = {n for _, _, p in boft_processors(self.unet) for n in p.active_adapters}
        return [n for n in self.boft_adapters if n in active]

    def save_boft(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Write one adapter (+ the control head in `control_head/`, + its learned identifier
        embeddings) in the layout `load_boft` reads."""
        folder = boft_diffusion.save_boft(self.unet, save_directory, adapter_name)
        identifier = self._identifiers.get(require_adapter(self.unet, adapter_name))
        if identifier is not None:
            save_identifier_embeddings(identifier, folder)
        if self.control_head is not None:
            self.control_head.save_pretrained(folder / CONTROL_HEAD_FOLDER)
        return folder

    def _check_control_head(self, head: ControlHead, source) -> None:
        conv_in = self.unet.conv_in.out_channels
        if head.config.out_channels != conv_in or head.config.downscale_factor != self.vae_scale_factor:
            raise ValueError(
                f"Control head {source} was made for another model: it outputs {head.config.out_channels} channels "
                f"at 1/{head.config.downscale_factor} of the image size, this pipeline needs {conv_in} channels "
                f"(unet.conv_in) at 1/{self.vae_scale_factor} (the VAE's scale factor)."
            )

    @property
    def boft_adapters(self) -> list[str]:
        """Names of the installed BOFT adapters."""
        return adapter_names(self.unet)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Which BOFT adapters apply, composed in this order (R = R_first R_second ...); [] disables all.

        Names that are not BOFT adapters are passed on to diffusers' LoRA `set_adapters`.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        boft = set(self.boft_adapters)
        if not names and not boft:  # nothing to switch off (diffusers' LoRA path would fail without LoRA)
            return
        if not boft or (names and not set(names) & boft):
            return super().set_adapters(adapter_names, adapter_weights)
        if not set(names) <= boft:
            raise ValueError(f"Adapters {sorted(set(names) - boft)} are not BOFT adapters {sorted(boft)}; "
                             "set BOFT and LoRA adapters in separate calls.")
        if adapter_weights is not None:
            raise ValueError("BOFT adapters take no weights; use set_active_factors to weaken one.")
        boft_diffusion.set_active_adapters(self.unet, names)
        self._apply_identifiers()

    def set_active_factors(
        self, k: int | None = None, adapter_name: str | None = None, mask: Sequence[bool] | None = None
    ) -> None:
        """Keep butterfly factors 0..k-1 of an adapter (or those in `mask`), the rest act as identity.

        k = 0 leaves the base model plus the control head and the learned scale s. A fused
        pipeline is re-fused from the kept base weights.
        """
        boft_diffusion.set_active_factors(self.unet, k, adapter_name=adapter_name, mask=mask)

    def active_factors(self, adapter_name: str | None = None) -> list[bool]:
        return boft_diffusion.active_factors(self.unet, adapter_name)

    # ------------------------------------------------------------------ fusing
    @property
    def is_fused(self) -> bool:
        return any(p.fused for _, _, p in boft_processors(self.unet))

    def fuse(self) -> None:
        """Write W' = diag(s) W R^T into the UNet's projections; base weights are kept for `unfuse`."""
        boft_diffusion.fuse_boft(self.unet)

    def unfuse(self) -> None:
        """Restore the base weights exactly (BOFT then runs on activations again, as in training)."""
        boft_diffusion.unfuse_boft(self.unet)

    @contextlib.contextmanager
    def _sampling_weights(self):
        """Fuse for sampling when `fuse_for_sampling`. A fuse made here for adapters being trained (skew
        parameters requiring grad, as after add_boft; load_boft freezes them) is undone afterwards,
        so a trainer's validation samples fused, like a reload, and training goes on unfused."""
        fuse_here = self.fuse_for_sampling and not self.is_fused and bool(self.boft_adapters)
        if fuse_here:
            self.fuse()
        try:
            yield
        finally:
            if fuse_here and any(r.boft_skew.requires_grad for n in self.boft_adapters
                                 for _, r in rotations(self.unet, n)):
                self.unfuse()

    # ------------------------------------------------------------------ control image
    def prepare_control_image(
        self,
        image,
        height: int,
        width: int,
        batch_size: int,
        num_images_per_prompt: int,
        device: torch.device,
        dtype: torch.dtype,
        resample: str = "bilinear",
    ) -> torch.Tensor:
        """Path / PIL / numpy / tensor (or a list of them) -> (batch_size * num_images_per_prompt, C, H, W) in [0, 1].

        Images of another size are resized to (height, width) with a warning. numpy and tensors
        hold values in [0, 1] (uint8 in [0, 255]); numpy is (H, W[, C]) or (B, H, W, C), tensors
        are (C, H, W) or (B, C, H, W).
        """
        if resample not in RESAMPLE:
            raise ValueError(f"control_resample must be one of {sorted(RESAMPLE)}, got {resample!r}.")
        channels = self.control_head.config.conditioning_channels
        items = image if isinstance(image, list) else [image]
        if not items:
            raise ValueError("control_image is an empty list.")
        image = torch.cat([_to_tensor(item, channels, height, width, resample) for item in items])  # (b, C, H, W)
        if image.shape[0] == 1:
            repeat = batch_size * num_images_per_prompt
        elif image.shape[0] == batch_size:
            repeat = num_images_per_prompt  # prompts are repeated per image the same way
        else:
            raise ValueError(f"Got {image.shape[0]} control images for {batch_size} prompts; pass one, or one per prompt.")
        return image.repeat_interleave(repeat, dim=0).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        control_scale: float = 1.0,
        control_resample: str = "bilinear",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images; arguments as `StableDiffusionPipeline.__call__` (other keywords pass through), plus:

        control_image: the control map (path, PIL image, numpy array or tensor in [0, 1], or a list:
            one, or one per prompt). Required when a control head is loaded, unless
            `control_scale=0.0`; an error when none is loaded. Resized to (height, width) with a
            warning when its size differs.
        control_scale: multiplies the head's residual; 0.0 generates without control.
        control_resample: "bilinear" (default), "bicubic" or "nearest" (use it for segmentation maps).
        """
        # 0. Default height and width to unet (as diffusers does)
        if not height or not width:
            size = self.unet.config.sample_size
            size = (size, size) if self._is_unet_config_sample_size_int else size
            height, width = size[0] * self.vae_scale_factor, size[1] * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            kwargs.get("ip_adapter_image"), kwargs.get("ip_adapter_image_embeds"), callback_on_step_end_tensor_inputs,
        )
        use_control = self.control_head is not None and control_scale != 0
        if self.control_head is None and control_image is not None:
            raise ValueError(
                "control_image was given but this pipeline has no control head: load_boft a folder with "
                f"{CONTROL_HEAD_FOLDER}/ or pass control_head=ControlHead.from_pretrained(...)."
            )
        if use_control and control_image is None:
            raise ValueError(
                "This pipeline has a control head: pass control_image= (a path, PIL image, array or tensor), "
                "or control_scale=0.0 to generate without control."
            )

        # 2. Control residual: the head runs once, every UNet call adds it after conv_in
        residual = None
        if use_control:
            batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
            head_dtype = next(self.control_head.parameters()).dtype
            image = self.prepare_control_image(
                control_image, height, width, batch_size, num_images_per_prompt, self._execution_device,
                head_dtype, control_resample,
            )
            residual = self.control_head(image) * control_scale  # (B * n, conv_in channels, h, w)

        # 3.-8. Prompt, timesteps, latents, denoising loop and decoding: diffusers' own loop
        control = control_residual(self.unet, residual) if residual is not None else contextlib.nullcontext()
        with self._sampling_weights(), control:
            return super().__call__(
                prompt=prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                latents=latents,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                output_type=output_type,
                return_dict=return_dict,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                **kwargs,
            )

    def interpolate(
        self,
        prompt: str,
        control_image=None,
        ks: Sequence[int] | None = None,
        adapter_name: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> list:
        """One image per number of active factors k (default m, m-1, ..., 0), all from the same seed.

        Keywords go to `__call__` (output_type "pil" by default). The adapter's previous active
        factors are restored afterwards.
        """
        if not isinstance(prompt, str) or kwargs.get("num_images_per_prompt", 1) != 1:
            raise ValueError("interpolate makes one image per k: pass a single prompt string and num_images_per_prompt=1.")
        if "generator" in kwargs:
            raise ValueError("interpolate seeds every image itself; pass seed=... instead of generator.")
        name = require_adapter(self.unet, adapter_name)
        m = boft_configs(self.unet)[name].n_butterfly_factors
        ks = list(range(m, -1, -1)) if ks is None else list(ks)
        previous = self.active_factors(name)
        images = []
        try:
            for k in ks:
                self.set_active_factors(k, adapter_name=name)
                generator = torch.Generator("cpu").manual_seed(seed)
                out = self(prompt, control_image, generator=generator, **kwargs)
                images.append((out.images if kwargs.get("return_dict", True) else out[0])[0])
        finally:
            self.set_active_factors(adapter_name=name, mask=previous)
        return images

    # ------------------------------------------------------------------ attention switches
    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Callable | None = None) -> None:
        """diffusers' xformers switch, keeping BOFT processors: they switch their backend instead.

        With BOFT installed, enabling needs xformers and CUDA, else the library's RuntimeError is
        raised before anything changes (diffusers would silently replace our processors).
        """
        self._boft_backend = "xformers" if valid else "sdpa"
        processors = [p for _, _, p in boft_processors(self.unet)] if self.unet is not None else []
        if not processors:
            return super().set_use_memory_efficient_attention_xformers(valid, attention_op)
        if valid:
            select_backend("xformers", self._execution_device)  # RuntimeError naming what is missing
            if attention_op is not None:
                logger.warning("BOFT attention uses xformers' default operator; attention_op applies to other modules.")
        for module in self._unet_attention_without_boft():
            module.set_use_memory_efficient_attention_xformers(valid, attention_op)
        for name, component in self.components.items():  # diffusers' own walk, UNet excluded
            if isinstance(component, torch.nn.Module) and component is not self.unet:
                for module in component.modules():
                    if isinstance(module, Attention):
                        module.set_use_memory_efficient_attention_xformers(valid, attention_op)
        for processor in processors:
            processor.backend = self._boft_backend

    def set_attention_slice(self, slice_size: int | None) -> None:
        """diffusers' attention slicing, refused for BOFT processors (they already use SDPA/xformers)."""
        if not any(True for _ in boft_processors(self.unet)):
            return super().set_attention_slice(slice_size)
        if slice_size is not None:
            raise ValueError(
                "Attention slicing would replace the BOFT attention processors; they compute attention with "
                "SDPA or xformers, which are already memory-efficient. Use enable_vae_slicing for the VAE."
            )
        for module in self._unet_attention_without_boft():
            module.set_attention_slice(None)

    def _unet_attention_without_boft(self) -> list[Attention]:
        with_boft = {id(attn) for _, attn, _ in boft_processors(self.unet)}
        return [m for m in self.unet.modules() if isinstance(m, Attention) and id(m) not in with_boft]

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save the base pipeline (and the control head); BOFT adapters are saved with `save_boft`.

        The UNet is written unfused and without BOFT processors, so the folder is a plain base model.
        """
        attached = [(attn, p) for _, attn, p in boft_processors(self.unet)]
        if not attached:
            return super().save_pretrained(save_directory, *args, **kwargs)
        logger.warning("BOFT adapters %s are not part of save_pretrained; save them with save_boft.", self.boft_adapters)
        fused = self.is_fused
        self.unfuse()
        try:
            for attn, processor in attached:
                attn.set_processor(processor.original_processor)
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            for attn, processor in attached:
                attn.set_processor(processor)
            if fused:
                self.fuse()


def _to_tensor(image, channels: int, height: int, width: int, resample: str) -> torch.Tensor:
    """One control input -> (b, channels, height, width) float in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image))
    if isinstance(image, PIL.Image.Image):
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            _warn_resize(image.size, width, height, resample)
            image = image.resize((width, height), RESAMPLE[resample])
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array.reshape(height, width, channels)).permute(2, 0, 1)[None]  # (1, C, H, W)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"A numpy control image is (H, W), (H, W, C) or (B, H, W, C); got shape {image.shape}.")
        array = image[..., None] if image.ndim == 2 else image
        array = array[None] if array.ndim == 3 else array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (B, C, H, W)
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4):
            raise ValueError(f"A tensor control image is (C, H, W) or (B, C, H, W); got shape {tuple(image.shape)}.")
        tensor = image[None] if image.ndim == 3 else image
    else:
        raise ValueError(
            f"control_image must be a path, PIL image, numpy array or tensor (or a list of them), got {type(image).__name__}."
        )
    tensor = tensor.detach().cpu()
    tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(
            f"Control image values must be in [0, 1] (uint8 in [0, 255]); got [{tensor.min():.3g}, {tensor.max():.3g}]. "
            "For a [-1, 1] tensor pass (x + 1) / 2."
        )
    if tensor.shape[1] == 1 and channels == 3:
        tensor = tensor.expand(-1, 3, -1, -1)
    elif tensor.shape[1] == 4 and channels == 3:
        tensor = tensor[:, :3]  # drop alpha
    if tensor.shape[1] != channels:
        raise ValueError(f"The control head takes {channels}-channel images; got {tensor.shape[1]} channels "
                         f"(shape {tuple(tensor.shape)}).")
    if tuple(tensor.shape[-2:]) != (height, width):
        _warn_resize((tensor.shape[-1], tensor.shape[-2]), width, height, resample)
        antialias = resample != "nearest"
        tensor = F.interpolate(tensor, size=(height, width), mode=resample, antialias=antialias).clamp(0, 1)
    return tensor


def _open_image(path: Path) -> PIL.Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"control_image file {path} does not exist.")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (PIL.UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"control_image {path} is not an image PIL can read ({err}).") from err


def _warn_resize(size: tuple[int, int], width: int, height: int, resample: str) -> None:
    logger.warning(
        "Control image is %dx%d but the generation size is %dx%d (width x height); resizing it (%s).",
        size[0], size[1], width, height, resample,
    )


def interpolation_grid(
    images_by_row: Sequence[Sequence],
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell_size: int | None = None,
    pad: int = 2,
) -> PIL.Image.Image:
    """A grid image: one row per control input, one column per k, with optional text labels.

    images_by_row: rows of PIL images or (H, W, 3) arrays in [0, 1] (as output_type="np" gives).
    labels: one per column (e.g. "k=3"); row_labels: one per row. cell_size upscales (nearest) the cells.
    """
    rows = [[_to_pil(image) for image in row] for row in images_by_row]
    if not rows or not rows[0]:
        raise ValueError("interpolation_grid needs at least one row with one image.")
    columns = len(rows[0])
    if any(len(row) != columns for row in rows):
        raise ValueError(f"All rows need the same number of images; got {[len(row) for row in rows]}.")
    if labels is not None and len(labels) != columns:
        raise ValueError(f"labels needs one entry per column ({columns}), got {len(labels)}.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels needs one entry per row ({len(rows)}), got {len(row_labels)}.")
    w = cell_size or max(image.width for row in rows for image in row)
    h = cell_size or max(image.height for row in rows for image in row)
    top = 12 if labels is not None else 0
    left = 6 * max(len(str(label)) for label in row_labels) + 4 if row_labels is not None else 0
    grid = PIL.Image.new("RGB", (left + columns * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for c, label in enumerate(labels or []):
        draw.text((left + pad + c * (w + pad), 0), str(label), fill="black")
    for r, row in enumerate(rows):
        y = top + pad + r * (h + pad)
        if row_labels is not None:
            draw.text((2, y + h // 2 - 5), str(row_labels[r]), fill="black")
        for c, image in enumerate(row):
            if image.size != (w, h):
                image = image.resize((w, h), PIL.Image.NEAREST)
            grid.paste(image, (left + pad + c * (w + pad), y))
    return grid


def _to_pil(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array.squeeze()).convert("RGB")
