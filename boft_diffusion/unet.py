"""Install, switch, fuse and remove BOFT adapters on a diffusers UNet, one processor per Attention."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import BOFTAttnProcessor, module_key, projection_layer
from .config import BOFTConfig
from .layers import ButterflyRotation


def attention_modules(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def boft_processors(unet: nn.Module) -> Iterator[tuple[str, Attention, BOFTAttnProcessor]]:
    for name, attn in attention_modules(unet):
        if isinstance(attn.processor, BOFTAttnProcessor):
            yield name, attn, attn.processor


def boft_configs(unet: nn.Module) -> dict[str, BOFTConfig]:
    """Configs of the adapters installed on `unet`, by adapter name."""
    return unet.__dict__.setdefault("_boft_configs", {})


def adapter_names(unet: nn.Module) -> list[str]:
    return list(boft_configs(unet))


def require_adapter(unet: nn.Module, adapter_name: str | None) -> str:
    names = adapter_names(unet)
    if not names:
        raise ValueError("This UNet has no BOFT adapter; call add_boft or load_boft first.")
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"The UNet has several BOFT adapters {names}; pass adapter_name.")
        return names[0]
    if adapter_name not in names:
        raise ValueError(f"No BOFT adapter named {adapter_name!r}; installed: {names}.")
    return adapter_name


def plan_rotations(unet: nn.Module, config: BOFTConfig) -> dict[str, dict[str, tuple[int, int, int]]]:
    """{attention path: {projection: (d, out, block_size)}} for every target; raises before any change."""
    plan = {}
    for name, attn in attention_modules(unet):
        plan[name] = {}
        for projection in config.target_modules:
            layer = projection_layer(attn, projection)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"{name}.{projection} is a {type(layer).__name__}; BOFT rotates nn.Linear projections.")
            block_size, _ = config.blocks_for(layer.in_features, f"{name}.{projection}")
            plan[name][projection] = (layer.in_features, layer.out_features, block_size)
    if not plan:
        raise ValueError(f"{type(unet).__name__} has no diffusers Attention modules to adapt.")
    return plan


def add_boft(unet: nn.Module, config: BOFTConfig, adapter_name: str = "default", backend: str = "auto") -> nn.Module:
    """Rotate the attention projections of `unet` with a new BOFT adapter (identity at init).

    Base weights are untouched; trainable parameters are fp32 on each projection's device.
    """
    if adapter_name in boft_configs(unet):
        raise ValueError(f"A BOFT adapter named {adapter_name!r} is already installed; pick another name.")
    if any(p.fused for _, _, p in boft_processors(unet)):
        raise ValueError("Unfuse the UNet (unfuse_boft) before adding an adapter.")
    plan = plan_rotations(unet, config)
    for name, attn in attention_modules(unet):
        processor = attn.processor
        if not isinstance(processor, BOFTAttnProcessor):
            processor = BOFTAttnProcessor(processor, backend=backend)
            attn.set_processor(processor)
        rotations = {}
        for projection, (d, out, block_size) in plan[name].items():
            weight = projection_layer(attn, projection).weight
            rotations[projection] = ButterflyRotation(
                d, out, block_size, config.n_butterfly_factors, config.train_scale, config.dropout, config.init
            ).to(weight.device)
        processor.add_adapter(adapter_name, rotations)
    boft_configs(unet)[adapter_name] = config
    return unet


def remove_boft(unet: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one adapter, or all (None); with none left the original processors come back."""
    names = adapter_names(unet) if adapter_name is None else [require_adapter(unet, adapter_name)]
    unfuse_boft(unet)
    for _, attn, processor in list(boft_processors(unet)):
        for name in names:
            if name in processor.adapters:
                del processor.adapters[name]
                if name in processor.active_adapters:
                    processor.active_adapters.remove(name)
        if not len(processor.adapters):
            attn.set_processor(processor.original_processor)
    for name in names:
        del boft_configs(unet)[name]
    return unet


def rotations(unet: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, ButterflyRotation]]:
    """(projection path, rotation) of one adapter, in module order."""
    adapter_name = require_adapter(unet, adapter_name)
    for name, _, processor in boft_processors(unet):
        adapter = processor.adapters[adapter_name] if adapter_name in processor.adapters else {}
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            if module_key(projection) in adapter:
                yield f"{name}.{projection}", adapter[module_key(projection)]


def _unfused_change(unet: nn.Module, change):
    """Run `change`, re-fusing from the kept base weights when the UNet was fused."""
    fused = any(p.fused for _, _, p in boft_processors(unet))
    if fused:
        unfuse_boft(unet)
    change()
    if fused:
        fuse_boft(unet)


def set_active_factors(
    unet: nn.Module, k: int | None = None, adapter_name: str | None = None, mask: Sequence[bool] | None = None
) -> None:
    """Keep factors 0..k-1 of an adapter and treat k..m-1 as identity (or any subset via `mask`).

    Trained values are never touched, so any k can be restored; `s` stays in effect.
    """
    adapter_name = require_adapter(unet, adapter_name)
    m = boft_configs(unet)[adapter_name].n_butterfly_factors
    if mask is None:
        k = m if k is None else k
        if not 0 <= k <= m:
            raise ValueError(f"Active factors k must be in 0..{m} for adapter {adapter_name!r}, got {k}.")
        mask = [i < k for i in range(m)]
    elif k is not None:
        raise ValueError("Pass either k or mask, not both.")
    elif len(mask) != m:
        raise ValueError(f"mask needs {m} entries (one per butterfly factor), got {len(mask)}.")

    def change():
        for _, rotation in rotations(unet, adapter_name):
            rotation.set_active(mask)

    _unfused_change(unet, change)


def active_factors(unet: nn.Module, adapter_name: str | None = None) -> list[bool]:
    _, rotation = next(rotations(unet, adapter_name))
    return list(rotation.active)


def set_active_adapters(unet: nn.Module, names: Sequence[str]) -> None:
    """Which adapters apply, in composition order R = R_names[0] R_names[1] ...; [] disables all."""
    for name in names:
        require_adapter(unet, name)

    def change():
        for _, _, processor in boft_processors(unet):
            processor.active_adapters = [n for n in names if n in processor.adapters]

    _unfused_change(unet, change)


def fuse_boft(unet: nn.Module) -> nn.Module:
    """Write W' = diag(s) W R^T into the projections (no per-step cost); base weights are kept."""
    for _, attn, processor in boft_processors(unet):
        processor.fuse(attn)
    return unet


def unfuse_boft(unet: nn.Module) -> nn.Module:
    """Restore the base weights exactly from the kept copies (no inversion)."""
    for _, attn, processor in boft_processors(unet):
        processor.unfuse(attn)
    return unet


def boft_parameters(unet: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """Trainable BOFT parameters (for the optimizer): the skews, and s where it is trained."""
    return [p for _, r in rotations(unet, adapter_name) for p in (r.boft_skew, r.boft_s) if p is r.boft_skew or r.train_scale]


def parameter_count(unet: nn.Module, adapter_name: str | None = None) -> tuple[int, dict[str, int]]:
    """(total, {projection path: count}) of trainable numbers of one adapter."""
    per_layer = {path: r.num_parameters() for path, r in rotations(unet, adapter_name)}
    return sum(per_layer.values()), per_layer


def describe(unet: nn.Module, adapter_name: str | None = None) -> str:
    """One line per adapted projection and a total, for logs and model cards."""
    name = require_adapter(unet, adapter_name)
    total, per_layer = parameter_count(unet, name)
    lines = [f"{path}: {r.extra_repr()}, params={r.num_parameters()}" for path, r in rotations(unet, name)]
    base = sum(p.numel() for n, p in unet.named_parameters() if ".processor." not in n)
    lines.append(f"adapter {name!r}: {total:,} trainable parameters in {len(per_layer)} projections "
                 f"({100 * total / max(base, 1):.3f}% of {base:,} base)")
    return "\n".join(lines)


@torch.no_grad()
def randomize_boft(unet: nn.Module, adapter_name: str | None = None, std: float = 0.1, generator=None) -> None:
    """Random skew entries and scales (for tests and demos of a non-identity adapter)."""
    for _, rotation in rotations(unet, adapter_name):
        rotation.boft_skew.copy_(torch.randn(rotation.boft_skew.shape, generator=generator) * std)
        if rotation.train_scale:
            rotation.boft_s.copy_(1 + torch.randn(rotation.boft_s.shape, generator=generator) * std)
