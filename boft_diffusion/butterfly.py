"""Butterfly orthogonal matrices, as in BOFT (Liu, Qiu et al., ICLR 2024).

For a layer of input size d, block size b and m factors:

    R   = B_{m-1} ... B_1 B_0                    (d x d, orthogonal)
    B_i = P_i blockdiag(Q_i1 ... Q_i(d/b)) P_i^T
    Q   = (I - S)(I + S)^-1,  S = skew(A)        (exact Cayley, b x b, fp32)

R is never built here. Factor i acts on chunks of c = b * 2^i features: each chunk is cut
into 2 * 2^i half-blocks of b/2, and block p of the chunk pairs half-blocks p and p + 2^i
(so the paired halves lie b * 2^(i-1) apart). Viewing a chunk as (2, 2^i, b/2) = (q, p, r),
block p holds the b features (q, r) in that order, which is a reshape, never a matrix.
This is the block order of PEFT's `boft_R[i, j]`, so PEFT checkpoints map one to one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


CPU_SOLVE_ONE_BY_ONE = 64  # block size from which Cayley solves (one by one on CPU) replace Gauss-Jordan


def num_skew_params(block_size: int) -> int:
    """Free entries of one b x b skew-symmetric block (its strict upper triangle)."""
    return block_size * (block_size - 1) // 2


def skew_from_packed(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., b(b-1)/2) -> (..., b, b) skew-symmetric, upper triangle = packed."""
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=packed.device)
    skew = packed.new_zeros(*packed.shape[:-1], block_size, block_size)
    skew[..., rows, cols] = packed
    return skew - skew.transpose(-1, -2)


def packed_from_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """(..., b, b) any square blocks -> packed skew part, the same reading PEFT makes of `boft_R`."""
    block_size = matrix.shape[-1]
    skew = 0.5 * (matrix - matrix.transpose(-1, -2))
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=matrix.device)
    return skew[..., rows, cols]


def cayley(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Exact Cayley transform of packed skew blocks, in fp32 or wider: (..., b(b-1)/2) -> (..., b, b).

    Q = (I - S)(I + S)^-1 = (I + S)^-1 (I - S) (the two factors commute); I + S is always
    invertible for skew S, and Q is orthogonal to rounding error. fp16 solves are not, so
    half-precision parameters are promoted; float64 stays float64 (for gradcheck).
    Differentiable, with the closed-form gradient of `Cayley`.
    """
    return Cayley.apply(packed, block_size)


class Cayley(torch.autograd.Function):
    """`cayley` as one autograd node. Blocks below CPU_SOLVE_ONE_BY_ONE are inverted by Gauss-Jordan
    (on CPU by the C++ kernels, `kernels.cpu`; elsewhere, or without them, with the batch last in
    PyTorch, `_cayley_gauss_jordan`), larger ones solved by torch.linalg.solve.

    Q = 2 (I + S)^-1 - I gives (I + S)^-1 = (Q + I) / 2, so dL/dS = -(Q + I)^T G (Q + I)^T / 2 for
    G = dL/dQ: two batched b x b matmuls instead of differentiating through the inverse."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, block_size: int) -> torch.Tensor:
        dtype = torch.promote_types(packed.dtype, torch.float32)
        if block_size >= CPU_SOLVE_ONE_BY_ONE:
            blocks = _cayley_by_solve(packed.to(dtype), block_size)
        else:
            blocks = _native().cayley(packed.to(dtype), block_size)
            if blocks is None:
                blocks = _cayley_gauss_jordan(packed.to(dtype), block_size)
        # Kept on ctx, detached, rather than saved: it is this node's own output, and a training
        # round runs under identity saved-tensor hooks (layers.RotationGroup.tensors), which would
        # make a saved output a reference cycle freed only by the garbage collector.
        ctx.blocks = blocks.detach()
        ctx.packed_dtype = packed.dtype
        return blocks

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        blocks = ctx.blocks
        b = blocks.shape[-1]
        native = _native().cayley_backward(blocks, grad.to(blocks.dtype)) if b < CPU_SOLVE_ONE_BY_ONE else None
        if native is not None:
            return native.to(ctx.packed_dtype), None
        q = blocks.reshape(-1, b, b)
        g = grad.to(blocks.dtype).reshape(-1, b, b)
        eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
        unscatter = _skew_scatter(b, blocks.dtype, blocks.device).mT.mul(-0.5)  # (b*b, b(b-1)/2)
        grad_packed = torch.empty(q.shape[0], unscatter.shape[1], dtype=blocks.dtype, device=blocks.device)
        for lo, hi in _slices(q.shape[0], b, blocks.device):
            k = q[lo:hi] + eye  # 2 (I + S)^-1
            grad_skew = torch.bmm(torch.bmm(k.mT, g[lo:hi]), k.mT)
            torch.mm(grad_skew.view(-1, b * b), unscatter, out=grad_packed[lo:hi])
        return grad_packed.view(*blocks.shape[:-2], -1).to(ctx.packed_dtype), None


def _native():
    """The C++ CPU kernels (`kernels.cpu`), imported on use: `kernels` builds on this module."""
    from .kernels import cpu

    return cpu


CAYLEY_SLICE = 1 << 18  # CPU: numbers per Gauss-Jordan pass (1 MB of fp32), so its working set stays in cache


def _slices(n: int, block_size: int, device: torch.device):
    """[lo, hi) ranges of blocks per pass: cache-sized on CPU, everything at once elsewhere."""
    step = max(1, CAYLEY_SLICE // (block_size * block_size)) if device.type == "cpu" else max(n, 1)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _cayley_gauss_jordan(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Q = 2 (I + S)^-1 - I, inverting I + S in place by Gauss-Jordan, batch last.

    I + S has symmetric part I (x^T (I + S) x = |x|^2), so elimination without pivoting is stable.
    With the batch last, each of the b elimination steps is a few elementwise ops over whole
    b x b x blocks slices, much faster than batched LU on 8 x 8 blocks; slices keep it in cache.
    S comes from the packed entries by one matmul with a +-1 scatter matrix (no index writes)."""
    b, flat = block_size, packed.reshape(math.prod(packed.shape[:-1]), packed.shape[-1])  # (blocks, b(b-1)/2)
    out = torch.empty(flat.shape[0], b, b, dtype=flat.dtype, device=flat.device)
    scatter = _skew_scatter(b, flat.dtype, flat.device).mT  # (b*b, b(b-1)/2)
    eye = torch.eye(b, dtype=flat.dtype, device=flat.device)
    for lo, hi in _slices(flat.shape[0], b, flat.device):
        a = torch.addmm(eye.view(b * b, 1), scatter, flat[lo:hi].mT, beta=0.5, alpha=0.5).view(b, b, -1)  # (I + S) / 2
        for k in range(b):
            col = a[:, k].clone()
            pivot = col[k].reciprocal()
            col[k] -= 1
            a[:, k] = eye[:, k, None]
            a.addcmul_(col[:, None], (a[k] * pivot)[None], value=-1)  # a is 2 (I + S)^-1 after step b-1
        out[lo:hi].view(hi - lo, b * b).copy_(a.view(b * b, -1).t())  # a 2-d transpose: torch copies it by tiles
        out[lo:hi].diagonal(dim1=-2, dim2=-1).sub_(1)
    return out.view(*packed.shape[:-1], b, b)


def _cayley_by_solve(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Q = (I + S)^-1 (I - S) by torch.linalg.solve, for large blocks."""
    skew = skew_from_packed(packed, block_size)
    eye = torch.eye(block_size, device=packed.device, dtype=packed.dtype)
    if packed.device.type == "cpu" and torch.get_num_threads() > 1 and skew.ndim > 2:
        # Batched CPU solves of blocks >= ~150 with more than one thread return garbage or raise
        # "Pivots given to lu_solve..." (torch 2.13 + MKL); one block at a time is right, and at
        # this size the loop's overhead is small next to each solve.
        flat = skew.reshape(-1, block_size, block_size)  # (blocks, b, b)
        solved = [torch.linalg.solve(eye + s, eye - s) for s in flat.unbind()]
        return torch.stack(solved).reshape(skew.shape) if solved else torch.empty_like(skew)
    return torch.linalg.solve(eye + skew, eye - skew)


_SCATTERS: dict = {}


def _skew_scatter(block_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(b(b-1)/2, b*b) with +1 at (r, c) and -1 at (c, r) of each packed entry (r < c): packed @ it = skew, flat."""
    key = (block_size, dtype, device)
    if key not in _SCATTERS:
        rows, cols = torch.triu_indices(block_size, block_size, offset=1)
        scatter = torch.zeros(rows.numel(), block_size * block_size, dtype=dtype)
        index = torch.arange(rows.numel())
        scatter[index, rows * block_size + cols] = 1
        scatter[index, cols * block_size + rows] = -1
        _SCATTERS[key] = scatter.to(device)
    return _SCATTERS[key]


def factor_view(x: torch.Tensor, factor: int, block_size: int) -> torch.Tensor:
    """(..., d) -> (..., d/c, 2, 2^i, b/2), c = b * 2^i: the (q, p, r) view of each chunk."""
    chunks = x.shape[-1] // (block_size << factor)  # (not -1: a reshape of no rows cannot infer it)
    if factor == 0:  # plain block diagonal (b may be odd): one "half" is the whole block
        return x.reshape(*x.shape[:-1], chunks, 1, 1, block_size)
    return x.reshape(*x.shape[:-1], chunks, 2, 2**factor, block_size // 2)


def block_view(blocks: torch.Tensor, factor: int, block_size: int) -> torch.Tensor:
    """(d/b, b, b) -> (d/c, 2^i, q, r, s, t): block (chunk, p) with rows (q, r), cols (s, t)."""
    if factor == 0:
        return blocks.reshape(-1, 1, 1, block_size, 1, block_size)
    half = block_size // 2
    return blocks.reshape(-1, 2**factor, 2, half, 2, half)


def apply_factor(x: torch.Tensor, blocks: torch.Tensor, factor: int, transpose: bool = False) -> torch.Tensor:
    """Row vectors times one butterfly factor: x B_i, or x B_i^T when `transpose`.

    x: (..., d); blocks: (d/b, b, b) of factor i. Cost d * b per row.
    """
    block_size = blocks.shape[-1]
    if transpose:
        blocks = blocks.transpose(-1, -2)
    xv = factor_view(x, factor, block_size)  # (..., d/c, 2, 2^i, b/2)
    qv = block_view(blocks.to(x.dtype), factor, block_size)  # (d/c, 2^i, 2, b/2, 2, b/2)
    out = torch.einsum("...cqpr,cpqrst->...cspt", xv, qv)  # (..., d/c, 2, 2^i, b/2)
    return out.reshape(x.shape)


def factor_grad(x: torch.Tensor, grad: torch.Tensor, factor: int, block_size: int, transpose: bool = False) -> torch.Tensor:
    """dL/dQ_i for y = x B_i (or x B_i^T) given dL/dy: per block, sum over rows of x_j^T dy_j. (d/b, b, b)."""
    xv = factor_view(x, factor, block_size)  # (..., d/c, 2, 2^i, b/2)
    gv = factor_view(grad, factor, block_size)
    g = torch.einsum("...cqpr,...cspt->cpqrst", xv, gv).reshape(-1, block_size, block_size)
    return g.transpose(-1, -2) if transpose else g


def factor_order(n_factors: int, active: Sequence[bool] | None, transpose: bool) -> list[int]:
    """Which factors to apply to row vectors, in order: x R applies B_{m-1} first, x R^T B_0 first."""
    order = range(n_factors) if transpose else range(n_factors - 1, -1, -1)
    return [i for i in order if active is None or active[i]]


def rotate_rows(
    x: torch.Tensor, blocks: torch.Tensor, active: Sequence[bool] | None = None, transpose: bool = False
) -> torch.Tensor:
    """x R (or x R^T) for R built from `blocks` (m, d/b, b, b), skipping inactive factors.

    Plain autograd: keeps one intermediate per factor for backward. The memory-lean
    autograd function lives in `layers.py`; this is its building block and reference.
    """
    for i in factor_order(blocks.shape[0], active, transpose):
        x = apply_factor(x, blocks[i], i, transpose)
    return x


def chunk_size(block_size: int, order: Sequence[int]) -> int:
    """Every factor i mixes features only within chunks of b * 2^i, so R (of the factors in
    `order`) is block diagonal with chunks of c = b * 2^(max i)."""
    return block_size * 2 ** max(order)


def chunk_matrices(blocks: torch.Tensor, order: Sequence[int], transpose: bool = False) -> torch.Tensor:
    """R's (or R^T's) diagonal c x c blocks, (d/c, c, c), from the factors in `order`.

    Rows of a tiled identity E (c, d) pass through the factors: (E R)[r, j*c:(j+1)*c] is row r
    of R's j-th diagonal block. Costs len(order) * b * d * c; differentiable.
    """
    n, b = blocks.shape[1], blocks.shape[-1]
    d, c = n * b, chunk_size(b, order)
    rows = torch.eye(c, dtype=blocks.dtype, device=blocks.device).repeat(1, d // c)  # (c, d)
    for i in order:
        rows = apply_factor(rows, blocks[i], i, transpose)
    return rows.view(c, d // c, c).transpose(0, 1)  # (d/c, c, c)


def rotate_by_chunks(x: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """x times block-diagonal chunks (d/c, c, c): one batched c x c matmul, d * c per row."""
    n, c, _ = chunks.shape
    xv = x.reshape(-1, n, c).transpose(0, 1)  # (d/c, rows, c)
    return torch.bmm(xv, chunks.to(x.dtype)).transpose(0, 1).reshape(x.shape)


def fits(features: int, block_size: int, n_factors: int) -> bool:
    """d % (b * 2^(m-1)) == 0 and b even when m > 1; never builds 2^(m-1) for an m that cannot fit."""
    if not (1 <= block_size <= features and n_factors >= 1) or n_factors - 1 >= features.bit_length():
        return False
    return features % (block_size << (n_factors - 1)) == 0 and (n_factors == 1 or block_size % 2 == 0)


def valid_block_sizes(features: int, n_factors: int) -> list[int]:
    """Block sizes b that fit `features` with `n_factors` butterfly factors."""
    return [b for b in range(1, features + 1) if fits(features, b, n_factors)]


def max_factors(features: int, block_size: int) -> int:
    """Largest m valid for this (d, b); m = 1 + log2(d/b) already makes R dense."""
    if features % block_size:
        return 0
    if block_size % 2:
        return 1
    m = 1
    while features % (block_size * 2**m) == 0:
        m += 1
    return m


def resolve_blocks(
    features: int,
    n_factors: int,
    block_size: int | None = None,
    block_num: int | None = None,
    layer: str = "layer",
) -> tuple[int, int]:
    """Check a (d, b or d/b, m) choice and return (block_size, block_num); ValueError names fixes.

    Valid iff d % (b * 2^(m-1)) == 0, and b is even when m > 1 (factors pair half-blocks).
    """
    if (block_size is None) == (block_num is None):
        raise ValueError("Set exactly one of block_size or block_num (the other follows from the layer size).")
    if n_factors < 1:
        raise ValueError(f"n_butterfly_factors must be >= 1 (1 is plain block-diagonal OFT), got {n_factors}.")
    if block_num is not None:
        if block_num < 1 or features % block_num:
            options = [features // b for b in valid_block_sizes(features, n_factors)]
            raise ValueError(
                f"{layer}: block_num={block_num} does not divide its input size d={features} "
                f"with m={n_factors} factors; valid block_num: {_nearest(options, block_num)}."
            )
        block_size = features // block_num
    assert block_size is not None
    if not fits(features, block_size, n_factors):
        sizes = valid_block_sizes(features, n_factors)
        hint = f"valid block_size for m={n_factors}: {_nearest(sizes, block_size)}" if sizes else (
            f"no block size fits m={n_factors}"
        )
        m_max = max_factors(features, block_size) if 0 < block_size <= features else 0
        m_hint = f"; with b={block_size} use m <= {m_max}" if m_max else ""
        raise ValueError(
            f"{layer}: block_size={block_size} with m={n_factors} butterfly factors does not fit "
            f"d={features} (needs d % (b * 2^(m-1)) == 0 and b even when m > 1); {hint}{m_hint}."
        )
    return block_size, features // block_size


def _nearest(options: list[int], target: int, k: int = 4) -> list[int]:
    """The k options closest to target on a log scale, sorted."""
    t = max(target, 1)
    return sorted(sorted(options, key=lambda o: abs(math.log(o / t)))[:k])
