"""The adapter as one object: everything an adapter is, found by its name in one registry on the UNet.

A `BOFTAdapter` holds its config, optional control head, optional identifier embeddings, control
scale and active factors. Its rotations live where they act, in the projections they rotate
(`BOFTLinear.boft[name]`), and are reached through the registry (`unet.rotations`-style walks).

The registry is a submodule of the UNet (`unet.boft_registry`), so `.to()`, `copy.deepcopy`,
`torch.compile`'s wrapper (`_orig_mod`) and DDP all carry it with the UNet. It never appears in
the UNet's state dict: `unet.save_pretrained` writes the base model, adapters are saved as
adapters.
"""

from __future__ import annotations

from torch import nn

from .config import BOFTConfig

REGISTRY_ATTR = "boft_registry"


class BOFTAdapter(nn.Module):
    """One adapter: config, control head, identifier embeddings, control scale, active factors."""

    def __init__(self, config: BOFTConfig):
        super().__init__()
        self.config = config
        self.control_head: nn.Module | None = None
        self.identifier: nn.Module | None = None
        self.control_scale = 1.0
        # Per factor: 1 on, 0 identity, t in (0, 1) fractional (see set_active_factors).
        self.factor_scales: tuple[float, ...] = (1.0,) * config.n_butterfly_factors

    @property
    def n_factors(self) -> int:
        return self.config.n_butterfly_factors

    @property
    def active_factors(self) -> float:
        """k: the number of active factors, fractional while one factor is partly on."""
        return float(sum(self.factor_scales))

    def extra_repr(self) -> str:
        return f"factors={list(self.factor_scales)}, control_scale={self.control_scale}"


class BOFTRegistry(nn.Module):
    """Adapters by name, which of them apply (in composition order), and whether BOFT is enabled."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.enabled = True
        self.register_state_dict_post_hook(_drop_all)
        self.register_load_state_dict_post_hook(_ignore_missing)


def registry(unet: nn.Module, create: bool = False) -> BOFTRegistry | None:
    """The UNet's registry (through a torch.compile wrapper too); created on demand."""
    unet = getattr(unet, "_orig_mod", unet)
    found = unet._modules.get(REGISTRY_ATTR)
    if found is None and create:
        found = BOFTRegistry()
        setattr(unet, REGISTRY_ATTR, found)
    return found


def base_module(unet: nn.Module) -> nn.Module:
    """The UNet itself, under a torch.compile wrapper if there is one."""
    return getattr(unet, "_orig_mod", unet)


def _drop_all(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _ignore_missing(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(REGISTRY_ATTR + ".") and f".{REGISTRY_ATTR}." not in k]
