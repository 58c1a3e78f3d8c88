"""Which BOFT pipeline a model folder needs, read from its model_index.json, and a clear error for
the model families this project does not support."""

from __future__ import annotations

import os

from diffusers import DiffusionPipeline

SD = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "BOFTPipeline"}
SDXL = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
        "BOFTStableDiffusionXLPipeline"}


def model_family(path_or_hub_id: str | os.PathLike, **kwargs) -> str:
    """"sd" or "sdxl" for a diffusers model folder or hub id; ValueError naming any other family."""
    try:
        config = DiffusionPipeline.load_config(path_or_hub_id, **{k: v for k, v in kwargs.items()
                                                                   if k in ("revision", "cache_dir", "token", "local_files_only")})
    except (OSError, ValueError) as err:
        raise ValueError(f"{path_or_hub_id} is not a diffusers pipeline folder or hub id with a model_index.json ({err}).") from err
    name = config.get("_class_name")
    if name in SD:
        return "sd"
    if name in SDXL:
        return "sdxl"
    raise ValueError(
        f"{path_or_hub_id} is a {name} model; boft-diffusion supports Stable Diffusion 1.x/2.x "
        "(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) models."
    )


def check_family(pipeline_class, path_or_hub_id, **kwargs) -> None:
    """Refuse, before loading anything, a model of another family than `pipeline_class` handles."""
    family = model_family(path_or_hub_id, **kwargs)
    if family != pipeline_class.family:
        right = {"sd": "BOFTPipeline", "sdxl": "BOFTStableDiffusionXLPipeline"}[family]
        raise ValueError(
            f"{path_or_hub_id} is an {'SDXL' if family == 'sdxl' else 'SD 1.x/2.x'} model: load it with "
            f"pipelines.{right}.from_pretrained (or pipelines.load_pipeline, which picks the class), not {pipeline_class.__name__}."
        )


def load_pipeline(path_or_hub_id: str | os.PathLike, **kwargs):
    """The BOFT pipeline for a model folder or hub id (SD 1.x/2.x or SDXL), chosen by its model_index.json."""
    from .boft_pipeline import BOFTPipeline
    from .boft_xl_pipeline import BOFTStableDiffusionXLPipeline

    family = model_family(path_or_hub_id, **kwargs)
    return {"sd": BOFTPipeline, "sdxl": BOFTStableDiffusionXLPipeline}[family].from_pretrained(path_or_hub_id, **kwargs)
