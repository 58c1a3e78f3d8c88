"""BOFTStableDiffusionXLPipeline: SDXL with the same BOFT adapters, control heads and factor interpolation.

A `StableDiffusionXLPipeline` subclass with `BOFTAdaptersMixin`, so the adapter verbs are those of
`BOFTPipeline` and diffusers' SDXL loop (two text encoders, pooled embeddings, add_time_ids) runs
unchanged. BOFT rotates every attention projection of the SDXL UNet (560 at full size).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from .adapters import BOFTAdaptersMixin


class BOFTStableDiffusionXLPipeline(BOFTAdaptersMixin, StableDiffusionXLPipeline):
    """SDXL + BOFT adapters (each with an optional control head); see `BOFTPipeline`.

    Learned identifier embeddings apply to the first text encoder (CLIP ViT-L), where the trainers
    learn them.
    """

    plain_pipeline_class = StableDiffusionXLPipeline
    family = "sdxl"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        control_scale: float | dict[str, float] = 1.0,
        control_guidance_start: float | dict[str, float] = 0.0,
        control_guidance_end: float | dict[str, float] = 1.0,
        control_resample: str = "bilinear",
        callback_on_step_end: Callable | None = None,
        **kwargs: Any,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generate images; keywords as `StableDiffusionXLPipeline.__call__`, plus the control
        arguments of `BOFTPipeline.__call__` (control_image, control_scale, control_guidance_start/end,
        control_resample)."""
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        embeds = kwargs.get("prompt_embeds")
        batch_size = len(prompt) if isinstance(prompt, list) else embeds.shape[0] if prompt is None and embeds is not None else 1
        call = dict(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            callback_on_step_end=callback_on_step_end, **kwargs,
            control_image=control_image, control_scale=control_scale, control_resample=control_resample,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
        )
        with self._boft_sampling(call, batch_size, height, width):
            return super().__call__(**call)
