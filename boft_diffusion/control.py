"""ControlNet-style control head of OFT/BOFT: a small conv encoder of the control image whose
output is added to the UNet's `conv_in` output.

Installed as a forward hook on `unet.conv_in`, so no UNet class is forked; the residual is
passed per call with `control_residual(unet, residual)`, so one head forward serves all
denoising steps (it takes no timestep or text) and DDP sees the head's own forward.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

HOOK_ATTR = "_boft_control_hook"
RESIDUAL_ATTR = "_boft_control_residual"


class ControlHead(ModelMixin, ConfigMixin):
    """8 convs with SiLU: image (B, 3, H, W) -> residual (B, out, H/f, W/f), f = downscale_factor.

    With SD's defaults (3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> 320, f = 8) it has
    about 1.1M parameters. The last conv starts at zero, so training starts at the base model.
    """

    @register_to_config
    def __init__(
        self,
        conditioning_channels: int = 3,
        out_channels: int = 320,
        downscale_factor: int = 8,
        block_channels: tuple[int, ...] = (16, 32, 96, 256),
    ):
        super().__init__()
        strides = int(math.log2(downscale_factor))
        if 2**strides != downscale_factor or strides > len(block_channels) - 1:
            raise ValueError(
                f"downscale_factor must be a power of two up to {2 ** (len(block_channels) - 1)} "
                f"(the VAE's scale factor), got {downscale_factor}."
            )
        layers: list[nn.Module] = [nn.Conv2d(conditioning_channels, block_channels[0], 3, padding=1), nn.SiLU()]
        for i, (c_in, c_out) in enumerate(zip(block_channels[:-1], block_channels[1:])):
            stride = 2 if i < strides else 1
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
        self.blocks = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(block_channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def for_unet(cls, unet, vae_scale_factor: int, block_channels: tuple[int, ...] | None = None) -> "ControlHead":
        """A head whose output matches `unet.conv_in` and the latent grid of the VAE."""
        out = unet.conv_in.out_channels
        if block_channels is None:  # SD's widths, narrowed for small UNets
            block_channels = (16, 32, 96, 256) if out >= 320 else (16, 32, 64, max(64, out))
        return cls(out_channels=out, downscale_factor=vae_scale_factor, block_channels=tuple(block_channels))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.blocks(image))  # (B, out, H/f, W/f)


def _add_residual(conv_in: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    residual = conv_in.__dict__.get(RESIDUAL_ATTR)
    if residual is None:
        return output
    if residual.shape[-2:] != output.shape[-2:]:
        raise ValueError(
            f"Control residual is {tuple(residual.shape[-2:])} but the latents are {tuple(output.shape[-2:])}: "
            "resize the control image to the generation size."
        )
    if residual.shape[0] != output.shape[0]:  # classifier-free guidance doubles the batch
        if output.shape[0] % residual.shape[0]:
            raise ValueError(f"Control batch {residual.shape[0]} does not divide the UNet batch {output.shape[0]}.")
        residual = residual.repeat(output.shape[0] // residual.shape[0], 1, 1, 1)
    return output + residual.to(output.dtype)


def attach_control(unet: nn.Module) -> None:
    """Let `unet.conv_in` add a control residual when one is set (a no-op otherwise)."""
    if HOOK_ATTR not in unet.conv_in.__dict__:
        unet.conv_in.__dict__[HOOK_ATTR] = unet.conv_in.register_forward_hook(_add_residual)


def detach_control(unet: nn.Module) -> None:
    """Remove the hook: the UNet is exactly the base again."""
    handle = unet.conv_in.__dict__.pop(HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
    unet.conv_in.__dict__.pop(RESIDUAL_ATTR, None)


def set_residual(unet: nn.Module, residual: torch.Tensor | None) -> None:
    """The residual the next UNet calls add (None: none); e.g. changed per step for a guidance window."""
    unet.conv_in.__dict__[RESIDUAL_ATTR] = residual


@contextmanager
def control_residual(unet: nn.Module, residual: torch.Tensor | None):
    """Within the block, every UNet call adds `residual` (the head's output) after conv_in."""
    attach_control(unet)
    set_residual(unet, residual)
    try:
        yield
    finally:
        unet.conv_in.__dict__.pop(RESIDUAL_ATTR, None)
