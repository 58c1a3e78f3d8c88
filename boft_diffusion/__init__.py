"""boft-diffusion: Orthogonal Butterfly finetuning (BOFT) for Stable Diffusion UNets."""

from .butterfly import cayley, resolve_blocks, rotate_rows
from .config import BOFTConfig
from .io import export_peft, load_boft, read_adapter, save_boft
from .unet import (
    active_factors,
    add_boft,
    adapter_names,
    boft_parameters,
    describe,
    fuse_boft,
    parameter_count,
    remove_boft,
    set_active_adapters,
    set_active_factors,
    unfuse_boft,
)

__version__ = "0.1.0"

__all__ = [
    "BOFTConfig",
    "active_factors",
    "add_boft",
    "adapter_names",
    "boft_parameters",
    "cayley",
    "describe",
    "export_peft",
    "fuse_boft",
    "load_boft",
    "parameter_count",
    "read_adapter",
    "remove_boft",
    "resolve_blocks",
    "rotate_rows",
    "save_boft",
    "set_active_adapters",
    "set_active_factors",
    "unfuse_boft",
]
