"""The BOFT adapter of one projection, and a frozen Linear run through one or more of them.

    y = s * ((x R) W^T) + bias        R = R_1 R_2 ... (one R per active adapter, composed)

Which side gets rotated is a cost decision (see `rotate_input_side`): rotating the rows of x
costs m*d*b per token; rotating W costs m*d*b per output row but, when training, also needs
the gradient of the rotated weight, a full tokens x d x out matmul.

Training runs each projection as one autograd node (`RotatedLinear`): it saves x (the very
tensor q, k and v all get, so once per attention), the small rotation tensors and the matmul
output u (for the gradient of s), and recomputes nothing else. The Cayley solves and R's chunk
matrices of all rotations that share a `RotationGroup` (one adapter's) are computed together,
once per step, in a few batched calls; without grad they are cached until the skew changes. Where
a fused kernel rotates rows (Triton on GPU, the C++ rows kernel on CPU for fp32, b = 8) no chunks
are built: the blocks go to the kernel as they are.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .butterfly import Cayley, cayley, chunk_size, factor_order, num_skew_params
from .kernels import chunks as chunk_ops

logger = logging.getLogger(__name__)

# Measured on CPU (benchmarks/README.md): a b x b block matmul per factor runs ~4x below its
# flop count (the reorder copies around tiny matmuls), one c x c chunk matmul near it; on top,
# each of its d/b tiny matmuls has a fixed cost of about 0.5 us, as much as ~25k multiply-adds.
FACTORED_OVERHEAD = 4
BLOCK_CALL_COST = 25_000


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


class RotationGroup:
    """Rotations whose Cayley blocks and chunk matrices are computed together: one batched solve
    and one chunk build per step for all members of the same shape (an adapter's 128 projections
    in SD 1.5), instead of a dozen small calls per projection.

    With grad, one computation (a "round") serves one forward: each member takes its tensors
    once; a member asking again (a second forward before the step, gradient checkpointing's
    recompute) starts a new round, as does a round whose graph backward has already used. A
    member that was not in the round (it was never asked for before) is computed alone. Without
    grad the results stay cached on each member until its skew or factors change.
    Not in the module tree (no state): `add_boft` links an adapter's rotations.
    """

    def __init__(self, members: Sequence["ButterflyRotation"]):
        self.members = list(members)
        self._rounds: dict = {}
        for member in self.members:
            member._group = self

    def __getstate__(self):  # deepcopy / pickle: members only, never tensors of a past round
        return {"members": self.members}

    def __setstate__(self, state):
        self.members, self._rounds = state["members"], {}

    def tensors(self, rotation: "ButterflyRotation", want_chunks: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(blocks (m, d/b, b, b), chunks of R (d/c, c, c) or None) for `rotation` now, in fp32
        (or the skew's wider dtype) whatever autocast says. A round's own saved tensors are kept
        as they are even inside a checkpointed region (identity hooks shadow checkpoint's): the
        round serves other regions too, so recomputing one region must not redo it."""
        wanted = want_chunks or bool(rotation._wants_chunks)
        if rotation._wants_chunks is not wanted:  # (a Module attribute write is slow: only on change)
            rotation._wants_chunks = wanted
        key = rotation._tensor_key()
        if rotation._fresh_dropout():  # its own seeded masks every call
            with _computing(rotation.boft_skew.device.type):
                return _compute([rotation], rotation.blocks())[0][0]
        if not (torch.is_grad_enabled() and rotation.boft_skew.requires_grad):
            cached = rotation._tensor_cache
            if cached is None or cached[0] != key or (want_chunks and cached[2] is None):
                with torch.no_grad():
                    stale = [r for r in self._peers(rotation) if r is rotation or r._stale(want=False)]
                    for member, tensors in zip(stale, _compute(stale)[0]):
                        member._tensor_cache = (member._tensor_key(), *tensors)
            return rotation._tensor_cache[1:]
        compat = rotation._compat_key()
        entries, taken, _ = self._rounds.get(compat, ({}, set(), None))
        entry = entries.get(id(rotation))
        if entry is not None and id(rotation) not in taken and entry[0] == key and (entry[2] is not None or not want_chunks):
            taken.add(id(rotation))
            return entry[1:]
        if entries and id(rotation) not in taken:  # a newcomer while the round is in use
            taken.add(id(rotation))
            return _compute([rotation])[0][0]
        members = self._peers(rotation)
        computed, blocks = _compute(members)
        entries = {id(r): (r._tensor_key(), *t) for r, t in zip(members, computed)}
        # The hook names the round by a token: holding the entries, it would close a cycle
        # (blocks -> hook -> entries -> blocks) that only the garbage collector frees, each step's.
        token = object()
        self._rounds[compat] = (entries, {id(rotation)}, token)
        if blocks.requires_grad:  # once backward has run through this round, it is spent
            blocks.register_hook(lambda grad, compat=compat, token=token: self._spend(compat, token))
        return entries[id(rotation)][1:]

    def _peers(self, rotation: "ButterflyRotation") -> list["ButterflyRotation"]:
        """Members to compute with `rotation`: same shape, used before, no fresh dropout masks;
        the ones that want chunks first (their blocks are then one contiguous slice)."""
        compat = rotation._compat_key()
        peers = [
            r for r in self.members
            if r is rotation or (r._wants_chunks is not None and r._compat_key() == compat and not r._fresh_dropout())
        ]
        if rotation not in peers:
            peers.append(rotation)
        return sorted(peers, key=lambda r: not r._wants_chunks)

    def _spend(self, compat, token) -> None:
        if compat in self._rounds and self._rounds[compat][2] is token:
            del self._rounds[compat]


def _autocast_off(device_type: str):
    """Autocast switched off, entered only where it is on (entering it costs more than the small
    ops it would guard)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


@contextlib.contextmanager
def _computing(device_type: str):
    """Where a round is computed: in fp32 whatever autocast says, its saved tensors kept as they are."""
    with _autocast_off(device_type), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        yield


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _compute(members: Sequence["ButterflyRotation"], blocks: torch.Tensor | None = None):
    """([(blocks, chunks or None)] per member, all blocks) for same-shape members: one Cayley
    solve and one chunk build."""
    first = members[0]
    with _computing(first.boft_skew.device.type):
        return _compute_now(members, blocks)


def _compute_now(members: Sequence["ButterflyRotation"], blocks: torch.Tensor | None):
    first = members[0]
    if blocks is None:
        packed = torch.cat([r.scaled_skew() for r in members], dim=1) if len(members) > 1 else first.scaled_skew()
        blocks = Cayley.apply(packed, first.block_size)  # (m, sum d/b, b, b)
    factors = first.factors()
    per_member = chunk_ops.split(blocks, [r.block_num for r in members], dim=1)  # (gradients written in place)
    chunked = [r for r in members if r._wants_chunks]
    out = [(b, None) for b in per_member]
    if chunked and factors:
        width = sum(r.block_num for r in chunked)
        chunks = chunk_ops.BuildChunks.apply(blocks[:, :width], factors)  # (sum d/c, c, c)
        c = chunk_size(first.block_size, factors)
        k = chunk_ops.padding(c, [r.in_features for r in chunked], blocks.device)
        if k > 1:  # small chunks rotate faster paired up (m = 1 on CPU)
            chunks, c = chunk_ops.PadChunks.apply(chunks, k), c * k
        for i, piece in enumerate(chunk_ops.split(chunks, [r.in_features // c for r in chunked])):
            out[i] = (out[i][0], piece)
    return out, blocks


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
        self._tensor_cache: tuple | None = None  # (key, blocks, chunks or None) without grad
        self._wants_chunks: bool | None = None  # None: never used; else whether it rotates by chunks
        self._group = RotationGroup([self])

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
        self._cache = self._tensor_cache = None

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
        blocks = Cayley.apply(self.scaled_skew(), self.block_size)
        if self.training and self.dropout > 0:
            if self.dropout_seed is None:
                draw = torch.rand(blocks.shape[:2], device=blocks.device)  # (m, d/b)
            else:
                draw = torch.rand(blocks.shape[:2], generator=torch.Generator().manual_seed(self.dropout_seed))
            drop = draw.to(blocks.device) < self.dropout
            eye = torch.eye(self.block_size, device=blocks.device)
            blocks = torch.where(drop[..., None, None], eye, blocks)
        return blocks

    def factors(self) -> tuple[int, ...]:
        """Active factor indices, ascending."""
        return _active_order(tuple(self.active), True)

    def order(self, transpose: bool) -> tuple[int, ...]:
        return _active_order(tuple(self.active), transpose)

    def step_tensors(self, want_chunks: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's (blocks, chunks of R or None), computed with the rest of the group."""
        return self._group.tensors(self, want_chunks)

    def rotate(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x R (transpose=False) or x R^T, for rows x (..., d), on the cheaper implementation."""
        order = self.order(transpose)
        if not order:
            return x
        if self.use_chunks(x.numel() // x.shape[-1], x.device, x.dtype):
            chunks = self.step_tensors(want_chunks=True)[1]
            if torch.is_grad_enabled():
                return chunk_ops.ChunkRotate.apply(x, chunks, transpose)
            return chunk_ops.rotate(x, chunks, transpose)
        return ButterflyRotate.apply(x, self.step_tensors(want_chunks=False)[0], order, transpose)

    def cost(self, rows: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
        """Work to rotate `rows` rows of `dtype` with the implementation `rotate` picks (for the side rule)."""
        order = self.order(False)
        if not order:
            return 0.0
        if kernels.fused_kernel_runs(device, dtype, self.block_size):
            return len(order) * self.block_size * self.in_features * rows
        return min(self._factored_cost(rows), self._chunk_cost(rows))

    def use_chunks(self, rows: int, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
        """One c x c matmul per chunk beats m block matmuls where no fused kernel runs (Triton on
        GPU, C++ on CPU) and c stays small (c = b * 2^(m-1), so chunks lose as m grows)."""
        if kernels.fused_kernel_runs(device, dtype, self.block_size):
            return False
        return self._chunk_cost(rows) < self._factored_cost(rows)

    def _factored_cost(self, rows: int) -> float:
        m, b, d = len(self.order(False)), self.block_size, self.in_features
        return m * b * d * rows * FACTORED_OVERHEAD + m * (d // b) * BLOCK_CALL_COST

    def _chunk_cost(self, rows: int) -> float:
        """d*c per row, plus (with grad) this rotation's share of the chunk build, batched with its
        group once per step: d*c*c for the top level's dense matmul, run near peak, so ~1/8 of it."""
        d, c = self.in_features, chunk_size(self.block_size, self.order(False))
        build = d * c * c // 8 if torch.is_grad_enabled() and self.boft_skew.requires_grad else 0  # cached without grad
        return d * c * rows + build

    def _tensor_key(self) -> tuple:
        skew = self.boft_skew
        return (id(skew), skew._version, skew.device, skew.dtype, self.factor_scales)

    def _compat_key(self) -> tuple:
        """Rotations with equal keys are computed in one batch."""
        return (self.block_size, self.n_factors, self.factors(), self.boft_skew.device, self.boft_skew.dtype)

    def _fresh_dropout(self) -> bool:
        return self.training and self.dropout > 0

    def _stale(self, want: bool) -> bool:
        cached = self._tensor_cache
        return cached is None or cached[0] != self._tensor_key() or (want and cached[2] is None)

    def extra_repr(self) -> str:
        return (
            f"d={self.in_features}, out={self.out_features}, block_size={self.block_size}, "
            f"block_num={self.block_num}, factors={self.n_factors}, active={list(self.factor_scales)}"
        )


@functools.lru_cache(maxsize=None)  # keyed by on/off patterns, not fractional scales: at most 2^(m+1) entries
def _active_order(active: tuple[bool, ...], transpose: bool) -> tuple[int, ...]:
    """`factor_order` of the factors switched on, memoised: every projection asks, every call."""
    return tuple(factor_order(len(active), active, transpose))


def link_rotations(rotations: Sequence[ButterflyRotation]) -> RotationGroup:
    """Compute these rotations' blocks and chunks together from now on (one adapter's, say)."""
    return RotationGroup(rotations)


def rotate_input_side(
    tokens: int, rotations: Sequence[ButterflyRotation], out_features: int, grad: bool, device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> bool:
    """True when x R is cheaper than R W^T for this call.

    Rotating costs per row what each rotation's implementation costs (`ButterflyRotation.cost`);
    the input side rotates `tokens` rows, the weight side `out_features` rows. Training the
    weight side also pays dL/dW' = x^T dy, tokens*d*out, which the input side never needs.
    """
    input_cost = sum(r.cost(tokens, device, dtype) for r in rotations)
    weight_cost = sum(r.cost(out_features, device, dtype) for r in rotations)
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


def _plan(rotations: Sequence[ButterflyRotation], rows: int, out_features: int, grad: bool, device, dtype) -> tuple | None:
    """How this call runs: None to rotate the weight, else how each active rotation is applied to
    x (of compute dtype `dtype`): ("chunks",) or ("blocks", order)."""
    if not rotate_input_side(rows, rotations, out_features, grad, device, dtype):
        return None
    return tuple(
        ("chunks",) if rotation.use_chunks(rows, device, dtype) else ("blocks", rotation.order(False))
        for rotation in rotations if rotation.order(False)
    )


def _stage_tensors(rotations: Sequence[ButterflyRotation], stages: tuple) -> list[torch.Tensor]:
    """This step's tensor of each active rotation for its stage: chunks or blocks."""
    active = [rotation for rotation in rotations if rotation.order(False)]
    return [
        r.step_tensors(want_chunks=True)[1] if stage[0] == "chunks" else r.step_tensors(want_chunks=False)[0]
        for r, stage in zip(active, stages)
    ]


def _rotate(z: torch.Tensor, stage: tuple, tensor: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """z R (or z R^T) by this stage's chunks or blocks (`stage[1]`: R's factor order)."""
    if stage[0] == "chunks":
        return chunk_ops.rotate(z, tensor, transpose)
    return kernels.rotate(z, tensor, stage[1][::-1] if transpose else stage[1], transpose)


def _rotate_backward(z: torch.Tensor, grad: torch.Tensor, stage: tuple, tensor: torch.Tensor, need: bool,
                     need_z: bool = True, slot=None):
    """(dL/dz (None when not `need_z` and skipping it saves work), dL/dtensor or None) for
    out = _rotate(z, stage, tensor); the chunks' or blocks' gradient goes into `slot` (`chunks.split`)
    when it is free."""
    if stage[0] == "chunks":
        grad_tensor = None
        if need:
            out = slot[0].claim(slot[1]) if slot is not None else None
            grad_tensor = _as(chunk_ops.chunks_grad(z, grad, tensor.shape[0], out=out), tensor.dtype)
        return (chunk_ops.rotate(grad, tensor, transpose=True) if need_z else None), grad_tensor
    out = slot[0].claim(slot[1]) if slot is not None and need else None
    return kernels.rotate_backward(z, grad, tensor, stage[1], False, need, need_x_grad=need_z, blocks_grad_out=out)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in dtype; a no-op `.to` still costs a dispatch, and the hot path makes ~14 a projection."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _scale_bias(u: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """s * u + bias in one pass."""
    scale = _as(scale, u.dtype)
    return u * scale if bias is None else torch.addcmul(_as(bias, u.dtype), u, scale)


class RotatedLinear(torch.autograd.Function):
    """y = s * ((x R_1 R_2 ...) W^T) + bias for a frozen W, as one autograd node.

    Saves x (no copy: q, k and v of an attention share it), W, s, the rotation tensors and, when
    s is trained, u = (x R) W^T. Forward rotates whichever of x and W has fewer rows. Backward:
    dL/dz = (g s) W, then back through each rotation (recomputing its input from x when several
    rotations compose).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, stages: tuple, *tensors):
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            z, w = _as(x, dtype), _as(weight, dtype)
            if x.numel() > x.shape[-1] * w.shape[0]:
                # (x R) W^T = x (W R^T)^T: with more rows in x than in W, rotating W is cheaper, and
                # backward needs only x either way.
                for stage, tensor in zip(reversed(stages), reversed(tensors)):
                    w = _rotate(w, stage, tensor, transpose=True)
            else:
                for stage, tensor in zip(stages, tensors):
                    z = _rotate(z, stage, tensor)
            u = F.linear(z, w)
            y = _scale_bias(u, scale, bias)
        ctx.stages, ctx.dtype = stages, dtype
        ctx.slots = [getattr(tensor, "grad_slot", None) for tensor in tensors]
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, scale, u if ctx.needs_input_grad[3] else None, *tensors)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale, u, *tensors = ctx.saved_tensors
        need = ctx.needs_input_grad
        dtype, stages = ctx.dtype, ctx.stages
        with _autocast_off(x.device.type):
            g, s = _as(grad, dtype), _as(scale, dtype)
            # dL/du = g s; with more numbers in g than in W (more tokens than d), (g s) W = g (s W) scales W
            g_u = g * s if need[1] or g.numel() <= weight.numel() else None
            g_z = None
            if need[0] or any(need[5:]):  # dL/dz, for x's gradient and the rotations' (text k/v need only the latter)
                w = _as(weight, dtype)
                g_z = torch.matmul(g_u, w) if g_u is not None else torch.matmul(g, w * s[:, None])
            inputs = [_as(x, dtype)]  # each rotation's input (and the last output, for dL/dW)
            for stage, tensor in zip(stages, tensors):
                if len(inputs) >= len(tensors) + need[1]:
                    break
                inputs.append(_rotate(inputs[-1], stage, tensor))
            grad_weight = None
            if need[1]:
                grad_weight = (g_u.reshape(-1, g_u.shape[-1]).mT @ inputs.pop().reshape(-1, x.shape[-1])).to(weight.dtype)
            grad_tensors = [None] * len(tensors)
            for j in range(len(tensors) - 1, -1, -1) if g_z is not None else ():  # dL/dx only when x needs it
                g_z, grad_tensors[j] = _rotate_backward(
                    inputs[j], g_z, stages[j], tensors[j], need[5 + j], j > 0 or need[0], ctx.slots[j]
                )
            grad_scale = grad_bias = None
            wide = torch.promote_types(g.dtype, torch.float32)  # sums over tokens: fp16/bf16 -> fp32, fp64 stays
            if need[3]:
                grad_scale = _as((_as(g, wide) * _as(u, wide)).reshape(-1, g.shape[-1]).sum(0), scale.dtype)
            if ctx.bias_dtype is not None and need[2]:
                grad_bias = _as(_as(g, wide).reshape(-1, g.shape[-1]).sum(0), ctx.bias_dtype)
        grad_x = _as(g_z, x.dtype) if need[0] else None
        return grad_x, grad_weight, grad_bias, grad_scale, None, *grad_tensors


def boft_linear(x: torch.Tensor, linear: nn.Linear, rotations: Sequence[ButterflyRotation],
                plans: dict | None = None) -> torch.Tensor:
    """s * ((x R) W^T) + bias for a frozen `linear`, choosing the cheaper side to rotate. `plans`
    memoises that choice per call shape (`BOFTLinear` keeps one): it is asked 128 times a step."""
    if not rotations:
        return linear(x)
    grad = torch.is_grad_enabled() and any(r.boft_skew.requires_grad or r.boft_s.requires_grad for r in rotations)
    tokens = x.numel() // x.shape[-1]
    scale = output_scale(rotations)
    dtype = _compute_dtype(x)
    if plans is None or torch.compiler.is_compiling():
        plan = _plan(rotations, tokens, linear.out_features, grad, x.device, dtype)
    else:
        fused = kernels.fused_kernel_runs(x.device, dtype, rotations[0].block_size)  # (follows BOFT_KERNEL)
        key = (tokens, grad, torch.is_grad_enabled(), x.device, dtype, fused,
               *((id(r), r.block_size, r.factor_scales, r.boft_skew.requires_grad) for r in rotations))
        plan = plans.get(key, False)
        if plan is False:
            if len(plans) >= 64:  # token counts of many resolutions: start over rather than grow
                plans.clear()
            plan = plans[key] = _plan(rotations, tokens, linear.out_features, grad, x.device, dtype)
    if plan is None:
        return _scale_bias(F.linear(x, rotated_weight(linear.weight, rotations)), scale, linear.bias)
    tensors = _stage_tensors(rotations, plan)
    if torch.is_grad_enabled():
        return RotatedLinear.apply(x, linear.weight, linear.bias, scale, plan, *tensors)
    for stage, tensor in zip(plan, tensors):
        x = _rotate(x, stage, tensor)
    return _scale_bias(F.linear(x, linear.weight), scale, linear.bias)


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
        self._plans: dict = {}  # boft_linear's memo of how to run each call shape
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
        return boft_linear(x, self, self.active_rotations(), self._plans)

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
