"""diffusers pipelines for BOFT adapters: load adapters + control head, set active factors, fuse, interpolate."""

from .boft_pipeline import BOFTPipeline, interpolation_grid

__all__ = ["BOFTPipeline", "interpolation_grid"]
