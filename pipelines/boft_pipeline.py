"""BOFTPipeline: Stable Diffusion 1.x/2.x with BOFT adapters, control heads and factor interpolation.

A `StableDiffusionPipeline` subclass, so diffusers' own loop (check inputs, encode prompt,
timesteps, latents, denoise, decode) runs unchanged; `BOFTAdaptersMixin` adds the adapter
lifecycle (load_boft, set_adapters, set_active_factors, fuse, delete_adapters, unload_boft,
save_pretrained with adapters, export_merged). What `__call__` adds:

- `control_image`: each active adapter with a control head gets its control image (one image,
  or {adapter: image} with several); their residuals, scaled per adapter, are summed and added
  after `conv_in` within `control_guidance_start`/`end`, as diffusers' MultiControlNet does;
- sampling uses fused weights (W' = diag(s) W R^T merged once; `set_active_factors` re-merges in
  place), and the active adapters' learned identifier embeddings.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from boft_diffusion.control import ControlHead

from .adapters import BOFTAdaptersMixin


class BOFTPipeline(BOFTAdaptersMixin, StableDiffusionPipeline):
    """Stable Diffusion + BOFT adapters (each with an optional control head).

    `from_pretrained` of a plain Stable Diffusion folder gives a pipeline without adapters; add
    them with `load_boft`. A folder written by this class's `save_pretrained` brings its adapters.
    `control_head=` attaches a head to the UNet's single adapter (a trainer's validation).
    """

    plain_pipeline_class = StableDiffusionPipeline
    family = "sd"

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
        requires_safety_checker: bool = True,
        control_head: ControlHead | None = None,
    ):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker=requires_safety_checker)
        if control_head is not None:
            self.attach_control_head(control_head)

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
        control_scale: float | dict[str, float] = 1.0,
        control_guidance_start: float | dict[str, float] = 0.0,
        control_guidance_end: float | dict[str, float] = 1.0,
        control_resample: str = "bilinear",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images; arguments as `StableDiffusionPipeline.__call__` (other keywords pass through), plus:

        control_image: for the active adapters with a control head: one control map (path, PIL
            image, numpy array or tensor in [0, 1], or a list: one, or one per prompt) when one such
            adapter is active, else {adapter name: image}. Resized to (height, width) with a warning.
        control_scale: multiplies each adapter's control residual (a number, or {adapter: number});
            0.0 generates without that control. Adapters' own scales come from set_adapters.
        control_guidance_start / control_guidance_end: the fraction of steps where control acts
            (a number, or {adapter: number}), as in diffusers' ControlNet pipelines.
        control_resample: "bilinear" (default), "bicubic" or "nearest" (use it for segmentation maps).
        """
        if not height or not width:
            size = self.unet.config.sample_size
            size = (size, size) if self._is_unet_config_sample_size_int else size
            height, width = size[0] * self.vae_scale_factor, size[1] * self.vae_scale_factor
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            kwargs.get("ip_adapter_image"), kwargs.get("ip_adapter_image_embeds"), callback_on_step_end_tensor_inputs,
        )
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        call = dict(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, output_type=output_type, return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
            control_image=control_image, control_scale=control_scale, control_resample=control_resample,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
        )
        with self._boft_sampling(call, batch_size, height, width):
            return super().__call__(**call)
