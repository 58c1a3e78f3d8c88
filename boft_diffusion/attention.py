"""BOFT inside diffusers' `Attention` modules: the projections are wrapped, the processor stays diffusers'.

Why wrap projections instead of owning the attention processor: a processor that computes
attention itself must copy diffusers' attention code (and fall behind it), and every diffusers
call that sets processors (`set_attn_processor`, `set_default_attn_processor`, xformers, attention
slicing, IP-Adapter, `torch.compile` recipes) silently replaces it. A wrapped projection
(`layers.BOFTLinear`) is called by whatever processor runs, so all of them keep the adapters;
diffusers' own LoRA moved from processors to wrapped modules for the same reason.

The one diffusers call that reads raw projection weights is `Attention.fuse_projections` (behind
`fuse_qkv_projections`): it would concatenate the base weights and drop the adapters for good, so
it is refused, with an error that says what to do, on every Attention whose q/k/v are adapted.
"""

from __future__ import annotations

import functools
from typing import Iterator

from diffusers.models.attention_processor import Attention
from torch import nn

from .layers import BOFTLinear

FUSED_BY_DIFFUSERS = ("to_q", "to_k", "to_v")  # what Attention.fuse_projections concatenates


def attention_modules(unet: nn.Module) -> Iterator[tuple[str, Attention]]:
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def projection_layer(attn: nn.Module, projection: str) -> nn.Module:
    """attn.to_q / attn.to_out[0] from the name 'to_q' / 'to_out.0'."""
    return attn.get_submodule(projection)


def wrapped_projection(attn: Attention, projection: str) -> BOFTLinear:
    """The BOFTLinear at `projection`, wrapping the Linear there first if needed."""
    layer = projection_layer(attn, projection)
    if isinstance(layer, BOFTLinear):
        return layer
    wrapper = BOFTLinear(layer)
    _replace(attn, projection, wrapper)
    if projection in FUSED_BY_DIFFUSERS:
        attn.__dict__["fuse_projections"] = functools.partial(_refuse_fuse_projections, attn)
    return wrapper


def unwrap_unused(attn: Attention) -> None:
    """Put the original Linear back wherever no adapter is left; drop the guard with the last one."""
    for name, layer in list(attn.named_modules()):
        if isinstance(layer, BOFTLinear) and not len(layer.boft):
            _replace(attn, name, layer.unwrap())
    if not any(isinstance(m, BOFTLinear) for m in attn.modules()):
        attn.__dict__.pop("fuse_projections", None)


def boft_linears(unet: nn.Module) -> Iterator[tuple[str, BOFTLinear]]:
    """(projection path, wrapper) of every adapted projection, in module order."""
    for name, module in unet.named_modules():
        if isinstance(module, BOFTLinear):
            yield name, module


def _replace(attn: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = attn.get_submodule(parent_path) if parent_path else attn
    setattr(parent, child, module)


def _refuse_fuse_projections(attn: Attention, fuse: bool = True) -> None:
    raise ValueError(
        "fuse_qkv_projections would merge the base q/k/v weights and drop the BOFT adapters on this UNet. "
        "Fuse the adapters instead (fuse_boft / pipe.fuse(): zero cost per step), or unload_boft() first."
    )
