"""Configs of the tiny Stable Diffusion: real diffusers/transformers classes at toy sizes.

Why these sizes (measured on one CPU core, see docs/tiny_model.md): 32 px images, a VAE that
downsamples x2 to 16x16x4 latents (an x4 VAE blurred the shapes away), a 1.5M-param UNet whose
attention widths are 32 and 64 (BOFT block size 8 takes up to 3 and 4 factors), a 2-layer CLIP
text encoder over our few-hundred-word vocabulary, trained jointly so colour words get learned.
"""

from __future__ import annotations

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
VAE_SCALE_FACTOR = 2  # 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
TEXT_DIM = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # replaced by 1/std of the trained latents before the UNet trains
)

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // VAE_SCALE_FACTOR,  # 16
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),  # attention at 16x16 (d=32) and 8x8 (d=64)
    layers_per_block=1,
    attention_head_dim=8,  # diffusers reads this as heads: 8 heads of 4 / 8 channels
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=16,
)

TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=4 * TEXT_DIM,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=TEXT_DIM,
    hidden_act="quick_gelu",
)

# SD's noise schedule; training uses DDPM, the shipped pipeline samples with DPM-Solver++.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(tokenizer):
    """CLIPTextModel sized to the tokenizer; EOS pooling uses the tokenizer's real EOS id."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    return CLIPTextModel(cfg)


def build_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, steps_offset=1)
