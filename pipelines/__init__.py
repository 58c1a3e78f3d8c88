"""diffusers pipelines for BOFT adapters: load adapters + control heads, set active factors, fuse, interpolate."""

from .boft_pipeline import BOFTPipeline
from .boft_xl_pipeline import BOFTStableDiffusionXLPipeline
from .families import load_pipeline, model_family
from .grid import interpolation_grid

__all__ = ["BOFTPipeline", "BOFTStableDiffusionXLPipeline", "interpolation_grid", "load_pipeline", "model_family"]
