"""A random tiny Stable Diffusion folder (the embedded model's architecture, untrained) for fast tests."""

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from boft_diffusion.tiny.components import build_sample_scheduler, build_text_encoder, build_unet, build_vae
from boft_diffusion.tiny.tokenizer import save_tokenizer


def write_tiny_sd(folder) -> str:
    """Save a seeded random tiny SD pipeline to `folder` and return its path."""
    torch.manual_seed(0)
    save_tokenizer(str(folder / "tokenizer_src"))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_src"))
    pipe = StableDiffusionPipeline(
        vae=build_vae(), text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer, unet=build_unet(),
        scheduler=build_sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder / "sd"))
    return str(folder / "sd")
