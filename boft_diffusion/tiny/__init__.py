"""The embedded tiny Stable Diffusion: 32 px shapes, trained by training/pretrain_tiny.py.

It ships inside the package so a machine with no GPU and no model hub can still run the real
job; scripts call `resolve_model(args.pretrained_model_name_or_path)` to fall back to it.
"""

from __future__ import annotations

import os

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")


def model_path() -> str:
    """Folder of the shipped diffusers pipeline (model_index.json, unet/, vae/, ...)."""
    return MODEL_DIR


def is_available() -> bool:
    return os.path.isfile(os.path.join(MODEL_DIR, "model_index.json"))


def resolve_model(name_or_path: str | None) -> str:
    """A user's model id/path, or the tiny model when none is given."""
    if name_or_path:
        return name_or_path
    if not is_available():
        raise FileNotFoundError(
            f"no model given and the tiny model is missing at {MODEL_DIR}; "
            "run training/pretrain_tiny.py or pass --pretrained_model_name_or_path")
    return MODEL_DIR


def load_pipeline(torch_dtype=None):
    """`StableDiffusionPipeline.from_pretrained(model_path())`, offline, no safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        resolve_model(None), torch_dtype=torch_dtype, safety_checker=None,
        requires_safety_checker=False, local_files_only=True)


__all__ = ["MODEL_DIR", "is_available", "load_pipeline", "model_path", "resolve_model"]
