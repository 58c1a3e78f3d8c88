"""BOFTAttnProcessor: a diffusers attention processor that owns the BOFT adapters of one Attention.

Installed with `Attention.set_processor`, so the UNet class is never forked and removing it
restores the original processor object. Being an `nn.Module`, its adapters are UNet
submodules (`...attn1.processor.adapters.<name>.to_q.boft_skew`): `.to()`, `.parameters()`,
DDP and accelerate see them like any weight.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PROJECTIONS
from .layers import ButterflyRotation, boft_linear, output_scale, rotated_weight

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers")


def module_key(projection: str) -> str:
    """ModuleDict keys cannot hold dots: 'to_out.0' -> 'to_out_0'."""
    return projection.replace(".", "_")


def projection_layer(attn: nn.Module, projection: str) -> nn.Linear:
    """attn.to_q / attn.to_out[0] from the name 'to_q' / 'to_out.0'."""
    return attn.get_submodule(projection)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # xformers raises more than ImportError when its build does not match torch
        return False
    return True


def select_backend(requested: str, device: torch.device) -> str:
    """'sdpa' or 'xformers' for this call: xformers only when installed and the tensors are on CUDA."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}.")
    if requested == "sdpa":
        return "sdpa"
    usable = device.type == "cuda" and xformers_available()
    if requested == "xformers" and not usable:
        raise RuntimeError(
            "xformers attention needs the xformers package and CUDA tensors "
            f"(installed: {xformers_available()}, device: {device}); use backend 'sdpa' or 'auto'."
        )
    return "xformers" if usable else "sdpa"


class BOFTAttnProcessor(nn.Module):
    """Computes diffusers attention with q/k/v/out projections rotated by BOFT adapters.

    `adapters[name][projection]` is a ButterflyRotation; the adapters named in
    `active_adapters` compose in that order (R = R_first R_second ...).
    """

    def __init__(self, original_processor, backend: str = "auto"):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.backend = backend
        self.fused = False
        # Kept outside the module tree: the original processor may itself be an nn.Module.
        self.__dict__["original_processor"] = original_processor

    def add_adapter(self, name: str, rotations: dict[str, ButterflyRotation]) -> None:
        self.adapters[name] = nn.ModuleDict({module_key(p): r for p, r in rotations.items()})
        self.active_adapters.append(name)

    def rotations(self, projection: str) -> list[ButterflyRotation]:
        key = module_key(projection)
        return [self.adapters[n][key] for n in self.active_adapters if key in self.adapters[n]]

    def project(self, attn: nn.Module, projection: str, x: torch.Tensor) -> torch.Tensor:
        layer = projection_layer(attn, projection)
        if self.fused:
            return layer(x)
        return boft_linear(x, layer, self.rotations(projection))

    # -- fusing: W' = diag(s) W R^T written into the Linear, original kept for an exact unfuse --
    def fuse(self, attn: nn.Module) -> None:
        if self.fused:
            self.unfuse(attn)
        for projection in _projections(self):
            layer = projection_layer(attn, projection)
            rotations = self.rotations(projection)
            # A non-persistent buffer: follows .to() with the UNet, never lands in a state dict.
            self.register_buffer(_base_name(projection), layer.weight.detach().clone(), persistent=False)
            if not rotations:
                continue
            with torch.no_grad():
                merged = rotated_weight(layer.weight.float(), rotations) * output_scale(rotations).float()[:, None]
                layer.weight.copy_(merged.to(layer.weight.dtype))
        self.fused = True

    def unfuse(self, attn: nn.Module) -> None:
        if not self.fused:
            return
        with torch.no_grad():
            for projection in _projections(self):
                name = _base_name(projection)
                if name in self._buffers:
                    projection_layer(attn, projection).weight.copy_(self._buffers.pop(name))
        self.fused = False

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        batch = hidden_states.shape[0]
        context_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self.project(attn, "to_q", hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self.project(attn, "to_k", encoder_hidden_states)
        value = self.project(attn, "to_v", encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        backend = select_backend(self.backend, query.device)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)  # (B*h, 1|T, S)
        if backend == "xformers":
            hidden_states = self._xformers(attn, query, key, value, attention_mask, head_dim)
        else:
            hidden_states = self._sdpa(attn, query, key, value, attention_mask, head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = self.project(attn, "to_out.0", hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _sdpa(attn, query, key, value, mask, head_dim):
        batch = query.shape[0]
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, T, hd)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, S, hd)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if mask is not None:
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])  # (B, h, 1|T, S)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=attn.scale
        )
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)  # (B, T, h*hd)

    @staticmethod
    def _xformers(attn, query, key, value, mask, head_dim):
        import xformers.ops

        batch = query.shape[0]
        query = attn.head_to_batch_dim(query).contiguous()  # (B*h, T, hd)
        key = attn.head_to_batch_dim(key).contiguous()
        value = attn.head_to_batch_dim(value).contiguous()
        if attn.norm_q is not None or attn.norm_k is not None:
            raise RuntimeError("xformers backend does not support q/k norms here; use backend='sdpa'.")
        if mask is not None:
            mask = mask.expand(-1, query.shape[1], -1)  # (B*h, T, S)
        out = xformers.ops.memory_efficient_attention(query, key, value, attn_bias=mask, scale=attn.scale)
        return attn.batch_to_head_dim(out).reshape(batch, -1, attn.heads * head_dim)


def _base_name(projection: str) -> str:
    """Buffer holding a projection's base weight while fused."""
    return f"base_weight_{module_key(projection)}"


def _projections(processor: BOFTAttnProcessor) -> Sequence[str]:
    """Projections that any adapter of this processor rotates, in PROJECTIONS order."""
    keys = {k for adapter in processor.adapters.values() for k in adapter.keys()}
    return [p for p in PROJECTIONS if module_key(p) in keys]
