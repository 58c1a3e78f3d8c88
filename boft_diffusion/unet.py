"""The adapter lifecycle on a diffusers UNet: add, activate, set factors, fuse, disable, delete, unload.

Every verb works on the UNet or on a `torch.compile` wrapper of it, and keeps one registry
(`adapter.BOFTRegistry`) and the wrapped projections (`layers.BOFTLinear`) in step.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .adapter import BOFTAdapter, base_module, registry
from .attention import attention_modules, boft_linears, projection_layer, unwrap_unused, wrapped_projection
from .config import BOFTConfig
from .layers import ButterflyRotation, link_rotations


def adapters(unet: nn.Module) -> dict[str, BOFTAdapter]:
    """The adapters installed on `unet`, by name (empty when none)."""
    found = registry(unet)
    return dict(found.adapters) if found is not None else {}


def adapter_names(unet: nn.Module) -> list[str]:
    return list(adapters(unet))


def boft_configs(unet: nn.Module) -> dict[str, BOFTConfig]:
    """Configs of the installed adapters, by name."""
    return {name: adapter.config for name, adapter in adapters(unet).items()}


def get_adapter(unet: nn.Module, adapter_name: str | None = None) -> BOFTAdapter:
    return adapters(unet)[require_adapter(unet, adapter_name)]


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
    for name, attn in attention_modules(base_module(unet)):
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


def add_boft(unet: nn.Module, config: BOFTConfig, adapter_name: str = "default") -> nn.Module:
    """Rotate the attention projections of `unet` with a new BOFT adapter (identity at init), active.

    Base weights are untouched; trainable parameters are fp32 on each projection's device.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"Adapter names are non-empty strings without dots, got {adapter_name!r}.")
    if adapter_name in adapter_names(unet):
        raise ValueError(f"A BOFT adapter named {adapter_name!r} is already installed; pick another name.")
    plan = plan_rotations(unet, config)
    fused = is_fused(unet)
    unfuse_boft(unet)
    model = base_module(unet)
    for name, attn in attention_modules(model):
        for projection, (d, out, block_size) in plan[name].items():
            wrapper = wrapped_projection(attn, projection)
            wrapper.boft[adapter_name] = ButterflyRotation(
                d, out, block_size, config.n_butterfly_factors, config.train_scale, config.dropout, config.init
            ).to(wrapper.weight.device)
    found = registry(model, create=True)
    found.adapters[adapter_name] = BOFTAdapter(config)
    found.active.append(adapter_name)
    link_rotations([rotation for _, rotation in rotations(model, adapter_name)])  # blocks and chunks batched per step
    _apply_active(model)
    if fused:
        fuse_boft(unet)
    return unet


def delete_adapters(unet: nn.Module, adapter_names: str | Sequence[str]) -> nn.Module:
    """Remove adapters (rotations, control head, identifier embeddings); with none left the UNet
    holds its original modules again, bit for bit."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for name in names:
        require_adapter(unet, name)
    fused = is_fused(unet)
    unfuse_boft(unet)
    model, found = base_module(unet), registry(unet)
    for attn_name, attn in attention_modules(model):
        for _, wrapper in list(boft_linears(attn)):
            for name in names:
                if name in wrapper.boft:
                    del wrapper.boft[name]
        unwrap_unused(attn)
    for name in names:
        del found.adapters[name]
        if name in found.active:
            found.active.remove(name)
    if not len(found.adapters):
        delattr(model, "boft_registry")
        return unet
    _apply_active(model)
    if fused:
        fuse_boft(unet)
    return unet


def remove_boft(unet: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one adapter, or all of them (None: `unload_boft`)."""
    return delete_adapters(unet, adapter_names(unet) if adapter_name is None else [require_adapter(unet, adapter_name)])


def unload_boft(unet: nn.Module) -> nn.Module:
    """Remove every adapter: the original projections are back and the base weights were never changed."""
    return delete_adapters(unet, adapter_names(unet)) if adapter_names(unet) else unet


def rotations(unet: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, ButterflyRotation]]:
    """(projection path, rotation) of one adapter, in module order."""
    adapter_name = require_adapter(unet, adapter_name)
    for path, wrapper in boft_linears(base_module(unet)):
        if adapter_name in wrapper.boft:
            yield path, wrapper.boft[adapter_name]


def _apply_active(unet: nn.Module) -> None:
    """Tell every wrapped projection which adapters apply (none while BOFT is disabled)."""
    found = registry(unet)
    active = list(found.active) if found is not None and found.enabled else []
    for _, wrapper in boft_linears(base_module(unet)):
        wrapper.active_adapters = [name for name in active if name in wrapper.boft]


def _unfused_change(unet: nn.Module, change) -> None:
    """Run `change`, re-fusing the merged weights (in place) when the UNet was fused."""
    change()
    if is_fused(unet):
        fuse_boft(unet)


def factor_scales(k, m: int, adapter_name: str) -> tuple[float, ...]:
    """k in [0, m] -> per-factor scales: factors below floor(k) on, factor floor(k) at the fraction, rest off."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(float(k)) or not 0 <= k <= m:
        raise ValueError(
            f"Active factors k must be a finite number in [0, {m}] for adapter {adapter_name!r}, got {k!r}."
        )
    k = float(k)
    whole = int(math.floor(k))
    return tuple(1.0 if i < whole else (k - whole if i == whole else 0.0) for i in range(m))


def set_active_factors(
    unet: nn.Module, k: float | None = None, adapter_name: str | None = None, mask: Sequence[bool] | None = None
) -> None:
    """Keep factors 0..k-1 of an adapter and treat the rest as identity (or any subset via a
    boolean `mask`). A fractional k = j + t fades factor j in as Cayley(t S), exactly orthogonal for
    every t, so the model moves smoothly from j factors to j + 1. Integer k is bit-identical to the
    whole-factor model. Trained values are never touched; `s` stays in effect.
    """
    name = require_adapter(unet, adapter_name)
    m = get_adapter(unet, name).n_factors
    if mask is not None:
        if k is not None:
            raise ValueError("Pass either k or mask, not both.")
        values = list(mask) if isinstance(mask, (list, tuple, np.ndarray)) else None
        if values is None or len(values) != m or not all(isinstance(a, (bool, np.bool_)) for a in values):
            raise ValueError(f"mask needs {m} booleans (one per butterfly factor), got {mask!r}.")
        scales = tuple(1.0 if a else 0.0 for a in values)
    else:
        scales = factor_scales(m if k is None else k, m, name)

    set_factor_scales(unet, scales, name)


def set_factor_scales(unet: nn.Module, scales: Sequence[float], adapter_name: str | None = None) -> None:
    """Per-factor scales in [0, 1] of one adapter as they are (what `set_active_factors` computes;
    also restores a state read from `BOFTAdapter.factor_scales`)."""
    adapter = get_adapter(unet, adapter_name)
    name = require_adapter(unet, adapter_name)
    scales = tuple(float(s) for s in scales)
    if len(scales) != adapter.n_factors or not all(0.0 <= s <= 1.0 for s in scales):
        raise ValueError(f"Adapter {name!r} needs {adapter.n_factors} factor scales in [0, 1], got {scales}.")

    def change():
        adapter.factor_scales = scales
        for _, rotation in rotations(unet, name):
            rotation.set_active(scales)

    _unfused_change(unet, change)


def active_factors(unet: nn.Module, adapter_name: str | None = None) -> list[bool]:
    """Which factors of an adapter act (a fractional one counts as active)."""
    return [scale > 0 for scale in get_adapter(unet, adapter_name).factor_scales]


def set_active_adapters(unet: nn.Module, names: Sequence[str]) -> None:
    """Which adapters apply, in composition order R = R_names[0] R_names[1] ...; [] disables all."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        require_adapter(unet, name)
    if len(set(names)) != len(names):
        raise ValueError(f"Adapter names repeat in {names}.")

    def change():
        registry(unet).active = names
        _apply_active(unet)

    _unfused_change(unet, change)


def get_active_adapters(unet: nn.Module) -> list[str]:
    """Adapters that apply now (empty while BOFT is disabled)."""
    found = registry(unet)
    return list(found.active) if found is not None and found.enabled else []


def set_boft_enabled(unet: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (the base model; nothing is forgotten) or back on."""
    found = registry(unet)
    if found is None:
        return

    def change():
        found.enabled = bool(enabled)
        _apply_active(unet)

    _unfused_change(unet, change)


def is_fused(unet: nn.Module) -> bool:
    return any(wrapper.fused for _, wrapper in boft_linears(base_module(unet)))


def fuse_boft(unet: nn.Module) -> nn.Module:
    """Merge W' = diag(s) W R^T of the active adapters (no per-step cost); base weights stay as they are."""
    for _, wrapper in boft_linears(base_module(unet)):
        wrapper.fuse()
    return unet


def unfuse_boft(unet: nn.Module) -> nn.Module:
    """Back to rotating on the fly (as in training); exact, since the base weights were never changed."""
    for _, wrapper in boft_linears(base_module(unet)):
        wrapper.unfuse()
    return unet


def boft_parameters(unet: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """Trainable BOFT parameters (for the optimizer): the skews, and s where it is trained."""
    return [p for _, r in rotations(unet, adapter_name) for p in (r.boft_skew, r.boft_s) if p is r.boft_skew or r.train_scale]


def parameter_count(unet: nn.Module, adapter_name: str | None = None) -> tuple[int, dict[str, int]]:
    """(total, {projection path: count}) of trainable numbers of one adapter."""
    per_layer = {path: r.num_parameters() for path, r in rotations(unet, adapter_name)}
    return sum(per_layer.values()), per_layer


def base_parameter_count(unet: nn.Module) -> int:
    """Parameters of the base model, adapters excluded."""
    return sum(t.numel() for t in base_module(unet).state_dict().values())


def describe(unet: nn.Module, adapter_name: str | None = None) -> str:
    """One line per adapted projection and a total, for logs and model cards."""
    name = require_adapter(unet, adapter_name)
    total, per_layer = parameter_count(unet, name)
    lines = [f"{path}: {r.extra_repr()}, params={r.num_parameters()}" for path, r in rotations(unet, name)]
    base = base_parameter_count(unet)
    lines.append(f"adapter {name!r}: {total:,} trainable parameters in {len(per_layer)} projections "
                 f"({100 * total / max(base, 1):.3f}% of {base:,} base)")
    return "\n".join(lines)


@torch.no_grad()
def randomize_boft(unet: nn.Module, adapter_name: str | None = None, std: float = 0.1, generator=None) -> None:
    """Random skew entries and scales (a non-identity adapter for demos and checks)."""
    for _, rotation in rotations(unet, adapter_name):
        rotation.boft_skew.copy_(torch.randn(rotation.boft_skew.shape, generator=generator) * std)
        if rotation.train_scale:
            rotation.boft_s.copy_(1 + torch.randn(rotation.boft_s.shape, generator=generator) * std)
    if is_fused(unet):
        fuse_boft(unet)
