"""The BOFT adapter of one projection, and a frozen Linear run through one or more of them.

    y = s * ((x R) W^T) + bias        R = R_1 R_2 ... (one R per active adapter, composed)

Which side gets rotated is a cost decision (see `rotate_input_side`): rotating the rows of x
costs m*d*b per token; rotating W costs m*d*b per output row but, when training, also needs
the gradient of the rotated weight, a full tokens x d x out matmul.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .butterfly import cayley, chunk_matrices, chunk_size, factor_order, num_skew_params, rotate_by_chunks

logger = logging.getLogger(__name__)

# Measured on CPU (benchmarks/README.md): a b x b block matmul per factor runs ~4x below its
# flop count (the reorder copies around tiny matmuls), one c x c chunk matmul near it.
FACTORED_OVERHEAD = 4


class ButterflyRotate(torch.autograd.Function):
    """x R (or x R^T) that saves only x and the blocks: backward recomputes the m intermediates
    for one layer at a time instead of keeping them for the whole network. The work runs on the
    fused Triton kernel on CUDA and on the PyTorch path elsewhere (`kernels`)."""

    @staticmethod
    def forward(ctx, x, blocks, order: tuple[int, ...], transpose: bool):
        ctx.save_for_backward(x, blocks)
        ctx.order, ctx.transpose = order, transpose
        return kernels.rotate(x, blocks, order, transpose)

    @staticmethod
    def backward(ctx, grad):
        x, blocks = ctx.saved_tensors
        grad_x, grad_blocks = kernels.rotate_backward(
            x, grad, blocks, ctx.order, ctx.transpose, need_blocks_grad=ctx.needs_input_grad[1]
        )
        return grad_x if ctx.needs_input_grad[0] else None, grad_blocks, None, None


class ButterflyRotation(nn.Module):
    """Trainable BOFT rotation of one projection: m factors of d/b Cayley blocks plus a scale s.

    Stores only what cannot be recomputed: the packed skew entries `boft_skew`
    (m, d/b, b(b-1)/2) and `boft_s` (out,). A zero skew block is the identity.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int,
        n_factors: int,
        train_scale: bool = True,
        dropout: float = 0.0,
        init: str = "identity",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.n_factors = block_size, n_factors
        self.dropout, self.train_scale = dropout, train_scale
        skew = torch.zeros(n_factors, in_features // block_size, num_skew_params(block_size))
        scale = torch.ones(out_features)
        if init == "random":
            skew.normal_(0.0, 0.1)
            if train_scale:
                scale.normal_(1.0, 0.1)
        self.boft_skew = nn.Parameter(skew)
        self.boft_s = nn.Parameter(scale, requires_grad=train_scale)
        # How much of each factor acts: 1 on, 0 identity, t in (0, 1) Cayley(t S) (fractional k).
        self.factor_scales: tuple[float, ...] = (1.0,) * n_factors
        # Block dropout draws from this seed when set (a trainer sets one per step and layer, so the
        # mask depends neither on the process count nor on a recomputing backward), else globally.
        self.dropout_seed: int | None = None
        self._cache: tuple | None = None
        self._chunk_cache: tuple | None = None

    @property
    def block_num(self) -> int:
        return self.in_features // self.block_size

    def num_parameters(self) -> int:
        """Trainable numbers: m * (d/b) * b(b-1)/2 skew entries, plus s when it is trained."""
        return self.boft_skew.numel() + (self.boft_s.numel() if self.train_scale else 0)

    @property
    def active(self) -> list[bool]:
        return [scale > 0 for scale in self.factor_scales]

    def set_active(self, scales: Sequence[float]) -> None:
        """Per factor: True/1 on, False/0 identity, t in (0, 1) its skew scaled by t (still a rotation)."""
        if len(scales) != self.n_factors:
            raise ValueError(f"Factor mask has {len(scales)} entries, the adapter has {self.n_factors} factors.")
        self.factor_scales = tuple(float(scale) for scale in scales)
        self._cache = self._chunk_cache = None

    def scaled_skew(self) -> torch.Tensor:
        """boft_skew with fractional factors scaled; the parameter itself when every factor is 0 or 1
        (so integer k stays bit-identical and costs nothing)."""
        if all(scale in (0.0, 1.0) for scale in self.factor_scales):
            return self.boft_skew
        scales = torch.tensor(self.factor_scales, dtype=self.boft_skew.dtype, device=self.boft_skew.device)
        return self.boft_skew * scales[:, None, None]  # (m, d/b, b(b-1)/2)

    def blocks(self) -> torch.Tensor:
        """Cayley blocks (m, d/b, b, b) in fp32, computed once per forward; cached when no grad flows."""
        if not torch.is_grad_enabled() and not (self.training and self.dropout > 0):
            key = (self.boft_skew._version, self.boft_skew.device, id(self.boft_skew), self.factor_scales)
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, cayley(self.scaled_skew().detach(), self.block_size))
            return self._cache[1]
        blocks = cayley(self.scaled_skew(), self.block_size)
        if self.training and self.dropout > 0:
            if self.dropout_seed is None:
                draw = torch.rand(blocks.shape[:2], device=blocks.device)  # (m, d/b)
            else:
                draw = torch.rand(blocks.shape[:2], generator=torch.Generator().manual_seed(self.dropout_seed))
            drop = draw.to(blocks.device) < self.dropout
            eye = torch.eye(self.block_size, device=blocks.device)
            blocks = torch.where(drop[..., None, None], eye, blocks)
        return blocks

    def order(self, transpose: bool) -> tuple[int, ...]:
        return tuple(factor_order(self.n_factors, self.active, transpose))

    def rotate(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x R (transpose=False) or x R^T, for rows x (..., d), on the cheaper implementation."""
        order = self.order(transpose)
        if not order:
            return x
        if self.use_chunks(x.numel() // x.shape[-1], x.device):
            return rotate_by_chunks(x, self.chunks(order, transpose))
        return ButterflyRotate.apply(x, self.blocks(), order, transpose)

    def chunks(self, order: tuple[int, ...], transpose: bool) -> torch.Tensor:
        """R's diagonal chunks (d/c, c, c), built from the blocks; cached when no grad flows."""
        if torch.is_grad_enabled() or (self.training and self.dropout > 0):
            return chunk_matrices(self.blocks(), order, transpose)
        key = ("chunks", self.boft_skew._version, id(self.boft_skew), self.boft_skew.device, self.factor_scales,
               order, transpose)
        if self._chunk_cache is None or self._chunk_cache[0] != key:
            self._chunk_cache = (key, chunk_matrices(self.blocks(), order, transpose))
        return self._chunk_cache[1]

    def cost(self, rows: int, device: torch.device) -> float:
        """Work to rotate `rows` rows with the implementation `rotate` picks (for the side rule)."""
        order = self.order(False)
        if not order:
            return 0.0
        d, b, m = self.in_features, self.block_size, len(order)
        factored = m * b * d * rows * (1 if kernels.fused_kernel_runs(device) else FACTORED_OVERHEAD)
        return min(factored, self._chunk_cost(rows))

    def use_chunks(self, rows: int, device: torch.device) -> bool:
        """One c x c matmul per chunk beats m block matmuls where the fused kernel does not run
        and c stays small (c = b * 2^(m-1), so chunks lose as m grows)."""
        if kernels.fused_kernel_runs(device):
            return False
        order = self.order(False)
        return self._chunk_cost(rows) < len(order) * self.block_size * self.in_features * rows * FACTORED_OVERHEAD

    def _chunk_cost(self, rows: int) -> float:
        order = self.order(False)
        d, b, c = self.in_features, self.block_size, chunk_size(self.block_size, order)
        build = 0 if not torch.is_grad_enabled() else len(order) * b * d * c  # cached without grad
        return d * c * rows + build

    def extra_repr(self) -> str:
        return (
            f"d={self.in_features}, out={self.out_features}, block_size={self.block_size}, "
            f"block_num={self.block_num}, factors={self.n_factors}, active={list(self.factor_scales)}"
        )


def rotate_input_side(
    tokens: int, rotations: Sequence[ButterflyRotation], out_features: int, grad: bool, device: torch.device
) -> bool:
    """True when x R is cheaper than R W^T for this call.

    Rotating costs per row what each rotation's implementation costs (`ButterflyRotation.cost`);
    the input side rotates `tokens` rows, the weight side `out_features` rows. Training the
    weight side also pays dL/dW' = x^T dy, tokens*d*out, which the input side never needs.
    """
    input_cost = sum(r.cost(tokens, device) for r in rotations)
    weight_cost = sum(r.cost(out_features, device) for r in rotations)
    if grad:
        weight_cost += tokens * rotations[0].in_features * out_features
    return input_cost <= weight_cost


def rotated_weight(weight: torch.Tensor, rotations: Sequence[ButterflyRotation]) -> torch.Tensor:
    """W R^T for R = R_1 R_2 ... R_k: W R_k^T ... R_1^T, rows of W rotated."""
    for rotation in reversed(rotations):
        weight = rotation.rotate(weight, transpose=True)
    return weight


def output_scale(rotations: Sequence[ButterflyRotation]) -> torch.Tensor:
    scale = rotations[0].boft_s
    for rotation in rotations[1:]:
        scale = scale * rotation.boft_s
    return scale


def boft_linear(x: torch.Tensor, linear: nn.Linear, rotations: Sequence[ButterflyRotation]) -> torch.Tensor:
    """s * ((x R) W^T) + bias for a frozen `linear`, choosing the cheaper side to rotate."""
    if not rotations:
        return linear(x)
    grad = torch.is_grad_enabled() and any(p.requires_grad for r in rotations for p in r.parameters())
    tokens = x.numel() // x.shape[-1]
    if rotate_input_side(tokens, rotations, linear.out_features, grad, x.device):
        for rotation in rotations:
            x = rotation.rotate(x)
        y = F.linear(x, linear.weight)
    else:
        y = F.linear(x, rotated_weight(linear.weight, rotations))
    y = y * output_scale(rotations).to(y.dtype)
    return y if linear.bias is None else y + linear.bias


class BOFTLinear(nn.Linear):
    """A frozen projection rotated by the BOFT adapters installed on it: y = s * ((x R) W^T) + bias.

    It takes over the original Linear's `weight` and `bias` Parameters (no copy) and keeps the
    original module to put back on removal, so the base model comes back as the same objects.
    Because it is still an `nn.Linear` whose forward is the whole BOFT computation, whatever
    attention processor diffusers runs (SDPA, xformers, sliced, IP-Adapter, ...) uses the
    adapters, with no attention code of ours.

    `boft[name]` is the adapter `name`'s rotation; `active_adapters` apply in that order. Fusing
    writes W' = diag(s) W R^T into a separate buffer, so `weight` always holds the base weights
    and unfusing is exact by construction.
    """

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.boft = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.register_buffer("boft_merged_weight", None, persistent=False)
        self.__dict__["base_layer"] = base  # outside the module tree: its Parameters are ours now
        self.register_state_dict_post_hook(_drop_adapter_state)
        self.register_load_state_dict_post_hook(_ignore_missing_adapter_state)

    def unwrap(self) -> nn.Linear:
        """The original Linear, holding this module's current Parameters (they may have moved or
        changed dtype since wrapping)."""
        base = self.__dict__["base_layer"]
        base.weight = self.weight
        base.register_parameter("bias", self.bias)
        return base

    def active_rotations(self) -> list[ButterflyRotation]:
        return [self.boft[name] for name in self.active_adapters]

    @property
    def fused(self) -> bool:
        return self.boft_merged_weight is not None

    @torch.no_grad()
    def fuse(self) -> None:
        """W' = diag(s) W R^T of the active adapters into `boft_merged_weight`, updated in place
        when already fused (a compiled graph that reads it is not recompiled)."""
        rotations = self.active_rotations()
        merged = self.weight
        if rotations:
            merged = rotated_weight(self.weight.float(), rotations) * output_scale(rotations).float()[:, None]
            if not torch.isfinite(merged).all():
                names = ", ".join(self.active_adapters)
                raise ValueError(f"Adapter(s) {names} give non-finite fused weights (NaN/Inf in boft_skew or boft_s).")
        merged = merged.to(self.weight.dtype)
        if self.fused and self.boft_merged_weight.shape == merged.shape and self.boft_merged_weight.dtype == merged.dtype:
            self.boft_merged_weight.copy_(merged)
        else:
            self.boft_merged_weight = merged.clone()

    def unfuse(self) -> None:
        self.boft_merged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.boft_merged_weight is not None:
            return F.linear(x, self.boft_merged_weight, self.bias)
        return boft_linear(x, self, self.active_rotations())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.boft)}, active={self.active_adapters}, fused={self.fused}"


def _drop_adapter_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """The base model's state dict stays the base model's: adapters are saved as adapters."""
    for key in [k for k in state_dict if k.startswith(prefix + "boft.")]:
        del state_dict[key]


def _ignore_missing_adapter_state(module: nn.Module, incompatible_keys) -> None:
    """Loading a base state dict into an adapted model is not missing anything."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".boft." not in k and not k.startswith("boft.")]
