"""boft-diffusion: Orthogonal Butterfly finetuning (BOFT) for Stable Diffusion UNets."""

from .adapter import BOFTAdapter
from .butterfly import cayley, resolve_blocks, rotate_rows
from .config import BOFTConfig
from .io import export_peft, load_boft, read_adapter, save_boft
from .layers import BOFTLinear
from .unet import (
    active_factors,
    adapter_names,
    adapters,
    add_boft,
    boft_parameters,
    delete_adapters,
    describe,
    fuse_boft,
    get_active_adapters,
    get_adapter,
    parameter_count,
    remove_boft,
    set_active_adapters,
    set_active_factors,
    set_boft_enabled,
    unfuse_boft,
    unload_boft,
)

__version__ = "0.1.0"

__all__ = [
    "BOFTAdapter",
    "BOFTConfig",
    "BOFTLinear",
    "active_factors",
    "adapter_names",
    "adapters",
    "add_boft",
    "boft_parameters",
    "cayley",
    "delete_adapters",
    "describe",
    "export_peft",
    "fuse_boft",
    "get_active_adapters",
    "get_adapter",
    "load_boft",
    "parameter_count",
    "read_adapter",
    "remove_boft",
    "resolve_blocks",
    "rotate_rows",
    "save_boft",
    "set_active_adapters",
    "set_active_factors",
    "set_boft_enabled",
    "unfuse_boft",
    "unload_boft",
]
