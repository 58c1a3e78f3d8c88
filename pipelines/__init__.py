"""diffusers pipelines for BOFT adapters: load adapters + control heads, set active factors, fuse, interpolate."""

from .boft_pipeline import BOFTPipeline
from .grid import interpolation_grid

__all__ = ["BOFTPipeline", "interpolation_grid"]
