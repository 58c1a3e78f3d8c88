"""Adapter files: our folder (boft_config.json + boft_weights.safetensors) and PEFT's BOFT folder.

Writes are atomic (temp file in the same folder, then rename), so a crash never leaves a
half-written adapter in place of a good one. Loading validates everything against the UNet
before installing anything. No pickle is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .butterfly import packed_from_matrix, skew_from_packed
from .config import CONFIG_NAME, PROJECTIONS, BOFTConfig
from .unet import add_boft, boft_configs, plan_rotations, remove_boft, require_adapter, rotations

WEIGHTS_NAME = "boft_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp over `path`; on any error `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def adapter_state_dict(unet, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{'<projection path>.boft_skew': (m, d/b, b(b-1)/2), '<path>.boft_s': (out,)} of one adapter."""
    state = {}
    for path, rotation in rotations(unet, adapter_name):
        state[f"{path}.boft_skew"] = rotation.boft_skew
        if rotation.train_scale:
            state[f"{path}.boft_s"] = rotation.boft_s
    return state


def save_boft(unet, save_directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter as boft_config.json + boft_weights.safetensors; returns the folder."""
    name = require_adapter(unet, adapter_name)
    folder = Path(save_directory)
    config = boft_configs(unet)[name]
    write_tensors(folder / WEIGHTS_NAME, adapter_state_dict(unet, name), {"format": "pt", "boft_config": config.to_json_string()})
    _write_text(folder / CONFIG_NAME, config.to_json_string())
    return folder


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt.") from err


def _read_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError variants
        raise ValueError(
            f"{path} cannot be read as plain tensors ({err}); refusing to unpickle it. "
            "Convert it to adapter_model.safetensors with PEFT."
        ) from err


def _read_our_folder(folder: Path) -> tuple[BOFTConfig, dict[str, torch.Tensor]]:
    config = BOFTConfig.from_json_file(folder / CONFIG_NAME)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    return config, _read_safetensors(folder / WEIGHTS_NAME)


def _read_peft_folder(folder: Path) -> tuple[BOFTConfig, dict[str, torch.Tensor]]:
    """PEFT BOFT adapter -> our config and state dict (boft_R's skew part, packed; s flattened)."""
    try:
        peft = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / PEFT_CONFIG_NAME} is not valid JSON ({err}).") from err
    if peft.get("peft_type") != "BOFT":
        raise ValueError(f"{folder} holds a PEFT {peft.get('peft_type')!r} adapter, not BOFT.")
    if peft.get("bias", "none") != "none" or peft.get("modules_to_save"):
        raise ValueError(f"{folder}: PEFT adapters that also train biases or extra modules are not supported.")
    if (folder / PEFT_WEIGHTS_NAME).is_file():
        raw = _read_safetensors(folder / PEFT_WEIGHTS_NAME)
    elif (folder / PEFT_PICKLE_NAME).is_file():
        raw = _read_pickle_weights(folder / PEFT_PICKLE_NAME)
    else:
        raise FileNotFoundError(f"{folder} has {PEFT_CONFIG_NAME} but neither {PEFT_WEIGHTS_NAME} nor {PEFT_PICKLE_NAME}.")
    state, projections, factors = {}, set(), set()
    for key, tensor in raw.items():
        path = key.removeprefix(PEFT_PREFIX)
        for suffix in (".boft_R", ".boft_s"):
            if path.endswith(suffix):
                layer = path[: -len(suffix)]
                break
        else:
            raise ValueError(f"{folder}: unexpected tensor {key!r} in a PEFT BOFT adapter.")
        projection = next((p for p in PROJECTIONS if layer.endswith("." + p)), None)
        if projection is None:
            raise ValueError(
                f"{folder}: {layer} is not an attention projection ({', '.join(PROJECTIONS)}); "
                "only adapters on attention projections can be loaded."
            )
        projections.add(projection)
        if suffix == ".boft_R":
            if tensor.ndim != 4 or tensor.shape[-1] != tensor.shape[-2]:
                raise ValueError(f"{folder}: {key} has shape {tuple(tensor.shape)}, expected [m, d/b, b, b].")
            factors.add(tensor.shape[0])
            state[f"{layer}.boft_skew"] = packed_from_matrix(tensor.float())
        else:
            state[f"{layer}.boft_s"] = tensor.float().reshape(-1)
    if len(factors) != 1:
        raise ValueError(f"{folder}: boft_R tensors disagree on the number of factors ({sorted(factors)}).")
    block_size, block_num = peft.get("boft_block_size") or None, peft.get("boft_block_num") or None
    config = BOFTConfig(
        block_size=block_size,
        block_num=None if block_size else block_num,
        n_butterfly_factors=factors.pop(),
        target_modules=[p for p in PROJECTIONS if p in projections],
        dropout=float(peft.get("boft_dropout", 0.0)),
        train_scale=True,
    )
    return config, state


def read_adapter(path: str | os.PathLike) -> tuple[BOFTConfig, dict[str, torch.Tensor], str]:
    """(config, state dict, 'boft' | 'peft') from an adapter folder of either format."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"No adapter folder at {folder}.")
    if (folder / CONFIG_NAME).is_file() or (folder / WEIGHTS_NAME).is_file():
        return (*_read_our_folder(folder), "boft")
    if (folder / PEFT_CONFIG_NAME).is_file():
        return (*_read_peft_folder(folder), "peft")
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise FileNotFoundError(
        f"{folder} is not a BOFT adapter: expected {CONFIG_NAME} + {WEIGHTS_NAME} (boft-diffusion) or "
        f"{PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME} (PEFT); found {present}."
    )


def _check_state(unet, config: BOFTConfig, state: dict[str, torch.Tensor], source: Path) -> None:
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
    missing = sorted(k for k in expected if k not in state and not (k.endswith(".boft_s") and not config.train_scale))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Adapter {source} was made for another model: {len(missing)} tensors missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})."
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"Adapter {source} was made for another model: {key} has shape {tuple(tensor.shape)}, "
                f"this UNet needs {expected[key]}."
            )


def load_boft(unet, path: str | os.PathLike, adapter_name: str = "default", backend: str = "auto") -> BOFTConfig:
    """Install the adapter in `path` (ours or PEFT's BOFT) as `adapter_name`; validates before changing the UNet."""
    config, state, _ = read_adapter(path)
    _check_state(unet, config, state, Path(path))
    add_boft(unet, BOFTConfig.from_dict({**config.to_dict(), "init": "identity"}), adapter_name, backend)
    try:
        with torch.no_grad():
            for layer, rotation in rotations(unet, adapter_name):
                rotation.boft_skew.copy_(state[f"{layer}.boft_skew"])
                if f"{layer}.boft_s" in state:
                    rotation.boft_s.copy_(state[f"{layer}.boft_s"])
    except BaseException:
        remove_boft(unet, adapter_name)
        raise
    return config


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
    folder = Path(save_directory)
    write_tensors(folder / PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
    _write_text(folder / PEFT_CONFIG_NAME, json.dumps(peft_config, indent=2) + "\n")
    return folder
