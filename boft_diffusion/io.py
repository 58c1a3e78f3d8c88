"""Adapter files: our folder (boft_config.json + boft_weights.safetensors) and PEFT's BOFT folder.

An adapter folder is written as a unit (`files.write_folder`), so a crash never leaves a
half-written adapter or a mix of two. Loading validates the config field by field and the
tensor shapes from the safetensors header (against the UNet) before any tensor is read, refuses
NaN/Inf, and installs nothing until everything passed. No pickle is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import torch

from .butterfly import num_skew_params, packed_from_matrix, skew_from_packed
from .config import CONFIG_NAME, MAX_FEATURES, PROJECTIONS, BOFTConfig, fraction_field, integer_field
from .adapter import base_module
from .files import read_json_object, read_tensors, readable_folder, require_finite, write_folder, write_tensors, write_text
from .identifier import IDENTIFIER_FILE, load_identifier_embeddings, save_identifier_embeddings
from .unet import (
    add_boft,
    boft_configs,
    fuse_boft,
    get_adapter,
    is_fused,
    plan_rotations,
    remove_boft,
    require_adapter,
    rotations,
)

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "boft_weights.safetensors"
CARD_NAME = "README.md"
CONTROL_HEAD_FOLDER = "control_head"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def adapter_state_dict(unet, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{'<projection path>.boft_skew': (m, d/b, b(b-1)/2), '<path>.boft_s': (out,)} of one adapter."""
    state = {}
    for path, rotation in rotations(unet, adapter_name):
        state[f"{path}.boft_skew"] = rotation.boft_skew
        if rotation.train_scale:
            state[f"{path}.boft_s"] = rotation.boft_s
    return state


def save_boft(
    unet,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    base_model: str | None = None,
    card_text: str = "",
    push_to_hub: bool = False,
    repo_id: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> Path:
    """Write one adapter as a unit: boft_config.json, boft_weights.safetensors, its control head
    (control_head/) and identifier embeddings when it has them, and a README.md model card.

    `push_to_hub=True` then uploads the folder to `repo_id` with huggingface_hub.
    """
    name = require_adapter(unet, adapter_name)
    adapter = get_adapter(unet, name)
    config = adapter.config
    folder = Path(save_directory)
    base_model = str(base_model or getattr(base_module(unet).config, "_name_or_path", "") or "") or None

    def fill(tmp: Path) -> None:
        metadata = {"format": "pt", "boft_config": config.to_json_string()}
        write_tensors(tmp / WEIGHTS_NAME, adapter_state_dict(unet, name), metadata)
        write_text(tmp / CONFIG_NAME, config.to_json_string())
        if adapter.control_head is not None:
            adapter.control_head.save_pretrained(tmp / CONTROL_HEAD_FOLDER)
        if adapter.identifier is not None:
            save_identifier_embeddings(adapter.identifier, tmp)
        write_text(tmp / CARD_NAME, adapter_card(unet, name, base_model, card_text))

    write_folder(folder, fill, owns=(CONFIG_NAME, WEIGHTS_NAME, CONTROL_HEAD_FOLDER, IDENTIFIER_FILE, CARD_NAME))
    if push_to_hub:
        push_folder(folder, repo_id, private=private, token=token)
    return folder


def adapter_card(unet, adapter_name: str, base_model: str | None, text: str = "") -> str:
    """README.md of an adapter folder: the hub's YAML header (base_model, library_name, tags, license)
    and what the adapter is and how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    from .unet import describe

    adapter = get_adapter(unet, adapter_name)
    tags = ["boft", "diffusers", "stable-diffusion", "text-to-image"]
    if adapter.control_head is not None:
        tags.append("controlnet")
    data = ModelCardData(base_model=base_model, library_name="diffusers", tags=tags, license="apache-2.0")
    c = adapter.config
    layout = f"block size {c.block_size}" if c.block_size else f"{c.block_num} blocks per factor"
    body = "\n".join([
        f"# BOFT adapter `{adapter_name}`",
        "",
        f"Orthogonal Butterfly finetuning (BOFT) adapter for `{base_model or 'a Stable Diffusion UNet'}`, "
        f"made with boft-diffusion: {layout}, {c.n_butterfly_factors} butterfly factors on "
        f"{', '.join(c.target_modules)}" + (", with a control head." if adapter.control_head is not None else "."),
        "",
        "```python",
        "from pipelines import BOFTPipeline",
        f"pipe = BOFTPipeline.from_pretrained({base_model or 'BASE_MODEL'!r})",
        f"pipe.load_boft(\"path/or/hub-id\", adapter_name={adapter_name!r})",
        "```",
        "",
        "```",
        describe(unet, adapter_name).splitlines()[-1],
        "```",
        "",
        text,
    ])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n"))


def push_folder(folder: Path, repo_id: str | None, private: bool | None = None, token: str | None = None) -> str:
    """Upload an adapter folder to the hub (creating the repo); returns the repo id."""
    from huggingface_hub import HfApi

    if not repo_id:
        raise ValueError("push_to_hub needs repo_id='user/name'.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload BOFT adapter")
    return repo_id


def resolve_adapter_path(path_or_hub_id: str | os.PathLike, subfolder: str | None = None,
                         revision: str | None = None) -> Path:
    """A local adapter folder, or a hub repo id fetched (or taken from the local cache) with huggingface_hub."""
    local = readable_folder(path_or_hub_id)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"{local} has no subfolder {subfolder!r}.")
        return folder
    repo_id = str(path_or_hub_id)
    if local.exists() or repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"No adapter folder at {path_or_hub_id} (and it is not a hub repo id 'user/name').")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{subfolder}/**"] if subfolder else None)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(
            f"No adapter folder at {path_or_hub_id}, and the hub repo {repo_id!r} (revision {revision or 'main'}) "
            f"could not be fetched or found in the local cache: {type(err).__name__}."
        ) from err
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hub repo {repo_id!r} has no subfolder {subfolder!r}.")
    return folder


ShapeCheck = Callable[[BOFTConfig, dict[str, tuple[int, ...]]], None]
MAX_SCALE = 1e4  # |s| beyond this is no trained adapter; its images would overflow to Inf/NaN


def _check_scales(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a finite but absurd per-output scale s (the skew may be anything: Cayley stays orthogonal)."""
    for key, tensor in tensors.items():
        if key.endswith(".boft_s") and tensor.numel() and tensor.abs().max() > MAX_SCALE:
            raise ValueError(
                f"{path}: tensor {key} scales outputs by up to {tensor.abs().max().item():.3g}; refusing values "
                f"beyond +-{MAX_SCALE:g} (no trained adapter has them, and every image would overflow to Inf/NaN)."
            )


def _read_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """PEFT's older adapter_model.bin as plain tensors (weights_only: nothing is unpickled)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... variants
        raise ValueError(
            f"{path} cannot be read as plain tensors ({err}); refusing to unpickle it. "
            "Convert it to adapter_model.safetensors with PEFT."
        ) from err
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point() for k, v in raw.items()
    ):
        raise ValueError(f"{path} does not hold named floating point tensors; it is not a PEFT BOFT adapter.")
    return raw


def _read_our_folder(folder: Path, check: ShapeCheck | None) -> tuple[BOFTConfig, dict[str, torch.Tensor]]:
    config = BOFTConfig.from_json_file(folder / CONFIG_NAME)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")

    def inspect(shapes: dict[str, tuple[int, ...]]) -> None:
        for key, shape in shapes.items():
            _check_our_tensor(config, key, shape, weights)
        if check is not None:
            check(config, shapes)

    state = read_tensors(weights, inspect)
    _check_scales(state, weights)
    return config, state


def _check_our_tensor(config: BOFTConfig, key: str, shape: tuple[int, ...], path: Path) -> None:
    """One tensor's shape against the config alone: skew (m, d/b, b(b-1)/2), s (out,)."""
    m, b, n = config.n_butterfly_factors, config.block_size, config.block_num
    if key.endswith(".boft_skew"):
        expected = f"({m}, {n or 'd/b'}, {num_skew_params(b) if b else 'b(b-1)/2'})"
        ok = len(shape) == 3 and shape[0] == m and shape[1] >= 1 and shape[1] == (n or shape[1]) and (
            shape[2] == num_skew_params(b) if b else _is_triangular(shape[2])
        )
    elif key.endswith(".boft_s"):
        expected, ok = "(out,)", len(shape) == 1 and shape[0] >= 1
    else:
        raise ValueError(f"{path}: unexpected tensor {key!r}; an adapter holds only <projection>.boft_skew and .boft_s.")
    if not ok:
        raise ValueError(f"{path}: tensor {key} has shape {shape}, but its {CONFIG_NAME} asks for {expected}.")


def _is_triangular(count: int) -> bool:
    """count == b(b-1)/2 for some block size b >= 1."""
    b = (1 + math.isqrt(1 + 8 * count)) // 2
    return b * (b - 1) // 2 == count


def _read_peft_config(path: Path) -> dict:
    """PEFT's adapter_config.json, its BOFT fields checked by name: {block_size, block_num, dropout}."""
    peft = read_json_object(path)
    if peft.get("peft_type") != "BOFT":
        raise ValueError(f"{path} describes a PEFT {peft.get('peft_type')!r} adapter, not BOFT.")
    if peft.get("bias", "none") not in ("none", None) or peft.get("modules_to_save"):
        raise ValueError(f"{path}: PEFT adapters that also train biases or extra modules are not supported.")
    fields = {k: 0 if peft.get(k) is None else peft[k] for k in ("boft_block_size", "boft_block_num", "boft_dropout")}
    try:
        layout = {
            "block_size": integer_field("boft_block_size", fields["boft_block_size"], 0, MAX_FEATURES),
            "block_num": integer_field("boft_block_num", fields["boft_block_num"], 0, MAX_FEATURES),
            "dropout": fraction_field("boft_dropout", fields["boft_dropout"]),
        }
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if not layout["block_size"] and not layout["block_num"]:
        raise ValueError(f"{path} sets neither boft_block_size nor boft_block_num.")
    declared = peft.get("boft_n_butterfly_factor")
    layout["declared_factors"] = declared if isinstance(declared, int) and not isinstance(declared, bool) else None
    return layout


def _peft_shapes(
    path: Path, layout: dict, shapes: dict[str, tuple[int, ...]]
) -> tuple[BOFTConfig, dict[str, str], dict[str, tuple[int, ...]]]:
    """From PEFT tensor shapes (boft_R [m, d/b, b, b], boft_s [out, 1]) alone: our config,
    PEFT key -> our key, and our shapes (skew (m, d/b, b(b-1)/2), s (out,))."""
    b, n = layout["block_size"], layout["block_num"]
    keys, ours, factors, projections = {}, {}, set(), set()
    for key, shape in shapes.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in (".boft_R", ".boft_s") if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{path}: unexpected tensor {key!r} in a PEFT BOFT adapter.")
        layer = name[: -len(suffix)]
        projection = next((p for p in PROJECTIONS if layer.endswith("." + p)), None)
        if projection is None:
            raise ValueError(
                f"{path}: {layer} is not an attention projection ({', '.join(PROJECTIONS)}); "
                "only adapters on attention projections can be loaded."
            )
        projections.add(projection)
        if suffix == ".boft_R":
            if not (len(shape) == 4 and min(shape) >= 1 and shape[2] == shape[3] == (b or shape[2]) and shape[1] == (n or shape[1])):
                raise ValueError(
                    f"{path}: {key} has shape {list(shape)}, expected [m, {n or 'd/b'}, {b or 'b'}, {b or 'b'}] "
                    "as its adapter_config.json says."
                )
            factors.add(shape[0])
            keys[key], ours[f"{layer}.boft_skew"] = f"{layer}.boft_skew", (shape[0], shape[1], num_skew_params(shape[2]))
        else:
            if not (len(shape) == 2 and shape[0] >= 1 and shape[1] == 1):
                raise ValueError(f"{path}: {key} has shape {list(shape)}, expected [out, 1].")
            keys[key], ours[f"{layer}.boft_s"] = f"{layer}.boft_s", (shape[0],)
    if len(factors) != 1:
        raise ValueError(f"{path}: boft_R tensors disagree on the number of factors ({sorted(factors)}) or are missing.")
    (m,) = factors
    if layout["declared_factors"] not in (None, m):
        logger.warning(
            "%s: adapter_config.json says boft_n_butterfly_factor=%s but boft_R holds %s factor(s); loading %s, "
            "what the tensors hold. PEFT without its CUDA extension (fbd_cuda) silently trains with 1 factor.",
            path, layout["declared_factors"], m, m,
        )
    try:
        config = BOFTConfig(
            block_size=b or None,
            block_num=None if b else n,
            n_butterfly_factors=factors.pop(),
            target_modules=[p for p in PROJECTIONS if p in projections],
            dropout=layout["dropout"],
            train_scale=True,
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err} (n_butterfly_factors is boft_R's first dimension)") from err
    return config, keys, ours


def _read_peft_folder(folder: Path, check: ShapeCheck | None) -> tuple[BOFTConfig, dict[str, torch.Tensor]]:
    """PEFT BOFT adapter -> our config and state dict (boft_R's skew part, packed; s flattened)."""
    layout = _read_peft_config(folder / PEFT_CONFIG_NAME)
    found: dict = {}

    def inspect(shapes: dict[str, tuple[int, ...]]) -> None:
        found["config"], found["keys"], ours = _peft_shapes(path, layout, shapes)
        if check is not None:
            check(found["config"], ours)

    if (folder / PEFT_WEIGHTS_NAME).is_file():
        path = folder / PEFT_WEIGHTS_NAME
        raw = read_tensors(path, inspect)
    elif (folder / PEFT_PICKLE_NAME).is_file():
        path = folder / PEFT_PICKLE_NAME
        raw = _read_pickle_weights(path)  # a pickle has no header: shapes are checked after reading
        inspect({k: tuple(v.shape) for k, v in raw.items()})
        raw = {k: v.float() for k, v in raw.items()}
        for key, tensor in raw.items():
            require_finite(tensor, key, path)
    else:
        raise FileNotFoundError(f"{folder} has {PEFT_CONFIG_NAME} but neither {PEFT_WEIGHTS_NAME} nor {PEFT_PICKLE_NAME}.")
    _check_scales(raw, path)
    state = {}
    for key, tensor in raw.items():
        ours = found["keys"][key]
        state[ours] = packed_from_matrix(tensor) if ours.endswith(".boft_skew") else tensor.reshape(-1)
    return found["config"], state


def read_adapter(
    path: str | os.PathLike, check: ShapeCheck | None = None
) -> tuple[BOFTConfig, dict[str, torch.Tensor], str]:
    """(config, state dict, 'boft' | 'peft') from an adapter folder of either format.

    Config fields are validated by name; tensor shapes are checked against the config, then by
    `check(config, shapes)` when given (load_boft checks them against the UNet), from the
    safetensors header before any tensor is read or converted; NaN/Inf values are refused.
    """
    folder = readable_folder(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"No adapter folder at {folder}.")
    if (folder / CONFIG_NAME).is_file() or (folder / WEIGHTS_NAME).is_file():
        return (*_read_our_folder(folder, check), "boft")
    if (folder / PEFT_CONFIG_NAME).is_file():
        return (*_read_peft_folder(folder, check), "peft")
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise FileNotFoundError(
        f"{folder} is not a BOFT adapter: expected {CONFIG_NAME} + {WEIGHTS_NAME} (boft-diffusion) or "
        f"{PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME} (PEFT); found {present}."
    )


def _check_state(unet, config: BOFTConfig, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Every expected tensor present with the right shape, nothing extra: else a ValueError naming it."""
    try:
        plan = plan_rotations(unet, config)
    except ValueError as err:
        raise ValueError(f"Adapter {source} does not fit this UNet: {err}") from err
    expected = {}
    for attn, projections in plan.items():
        for projection, (d, out, b) in projections.items():
            expected[f"{attn}.{projection}.boft_skew"] = (config.n_butterfly_factors, d // b, b * (b - 1) // 2)
            expected[f"{attn}.{projection}.boft_s"] = (out,)
    missing = sorted(k for k in expected if k not in shapes and not (k.endswith(".boft_s") and not config.train_scale))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Adapter {source} was made for another model: {len(missing)} tensors missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})."
        )
    for key, shape in shapes.items():
        if tuple(shape) != expected[key]:
            raise ValueError(
                f"Adapter {source} was made for another model: {key} has shape {tuple(shape)}, "
                f"this UNet needs {expected[key]}."
            )


def load_boft(
    unet,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    text_encoder=None,
    tokenizer=None,
    vae_scale_factor: int | None = None,
) -> BOFTConfig:
    """Install the adapter in a folder or hub repo (ours or PEFT's BOFT) as `adapter_name`, active,
    with its control head and identifier embeddings. Everything is read and checked against the
    model before the UNet changes: an adapter for another model raises and leaves it as it was.

    Identifier embeddings are checked against `text_encoder` and `tokenizer` (a pipeline passes
    them); a control head against `unet.conv_in` and, when given, the VAE's `vae_scale_factor`.
    """
    folder = resolve_adapter_path(path, subfolder, revision)
    config, state, _ = read_adapter(folder, check=lambda config, shapes: _check_state(unet, config, shapes, folder))
    head = _read_control_head(unet, folder, vae_scale_factor)
    identifier = None
    if (folder / IDENTIFIER_FILE).is_file():
        if text_encoder is None or tokenizer is None:
            raise ValueError(
                f"{folder} has learned identifier embeddings ({IDENTIFIER_FILE}); load it with a pipeline "
                "(BOFTPipeline.load_boft) or pass text_encoder= and tokenizer=."
            )
        identifier = load_identifier_embeddings(folder, text_encoder, tokenizer)
    add_boft(unet, BOFTConfig.from_dict({**config.to_dict(), "init": "identity"}), adapter_name)
    try:
        with torch.no_grad():
            for layer, rotation in rotations(unet, adapter_name):
                rotation.boft_skew.copy_(state[f"{layer}.boft_skew"])
                if f"{layer}.boft_s" in state:
                    rotation.boft_s.copy_(state[f"{layer}.boft_s"])
        adapter = get_adapter(unet, adapter_name)
        if head is not None:
            adapter.control_head = head.requires_grad_(False).eval()
        if identifier is not None:
            adapter.identifier = identifier.to(text_encoder.device).requires_grad_(False)
        if is_fused(unet):
            fuse_boft(unet)
    except BaseException:
        remove_boft(unet, adapter_name)
        raise
    return config


def _read_control_head(unet, folder: Path, vae_scale_factor: int | None):
    """The adapter's control head (None when it has none), checked against the UNet and VAE."""
    head_folder = folder / CONTROL_HEAD_FOLDER
    if not head_folder.is_dir():
        return None
    from .control import ControlHead

    model = base_module(unet)
    try:
        head = ControlHead.from_pretrained(head_folder, torch_dtype=model.dtype)
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{head_folder} is not a readable control head ({err}).") from err
    for name, tensor in head.state_dict().items():
        require_finite(tensor, name, head_folder)
    conv_in = model.conv_in.out_channels
    factor_ok = vae_scale_factor is None or head.config.downscale_factor == vae_scale_factor
    if head.config.out_channels != conv_in or not factor_ok:
        raise ValueError(
            f"Control head {head_folder} was made for another model: it outputs {head.config.out_channels} channels "
            f"at 1/{head.config.downscale_factor} of the image size, this model needs {conv_in} channels "
            f"(unet.conv_in)" + (f" at 1/{vae_scale_factor} (the VAE's scale factor)." if vae_scale_factor else ".")
        )
    return head.to(model.device)


def export_peft(unet, save_directory: str | os.PathLike, adapter_name: str | None = None, base_model: str | None = None) -> Path:
    """Write one adapter as a PEFT BOFT folder that `peft.PeftModel.from_pretrained(unet, dir)` loads."""
    name = require_adapter(unet, adapter_name)
    config = boft_configs(unet)[name]
    tensors = {}
    for layer, rotation in rotations(unet, name):
        tensors[f"{PEFT_PREFIX}{layer}.boft_R"] = skew_from_packed(rotation.boft_skew.detach().float(), rotation.block_size)
        tensors[f"{PEFT_PREFIX}{layer}.boft_s"] = rotation.boft_s.detach().float()[:, None]
    peft_config = {
        "peft_type": "BOFT",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "target_modules": list(config.target_modules),
        "boft_block_size": config.block_size or 0,
        "boft_block_num": config.block_num or 0,
        "boft_n_butterfly_factor": config.n_butterfly_factors,
        "boft_dropout": config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    def fill(tmp: Path) -> None:
        write_tensors(tmp / PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
        write_text(tmp / PEFT_CONFIG_NAME, json.dumps(peft_config, indent=2) + "\n")

    return write_folder(Path(save_directory), fill, owns=(PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_PICKLE_NAME))
