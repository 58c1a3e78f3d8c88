"""R as its diagonal chunks: build them from the Cayley blocks, rotate rows by them. The path where
no fused kernel runs: on CPU for fp64, bf16 and b != 8 or without AVX2 (fp32 with b = 8 takes the C++
rows kernel, `cpu.rotate_rows`), and on GPU without Triton.

Every factor i mixes features only within chunks of b * 2^i, so R (of the active factors) is
block diagonal with chunks of c = b * 2^(top active factor). Rotating a row by R is then one
batched c x c matmul per chunk, d * c per row, which CPU BLAS runs near its peak; applying the
m factors one by one costs m * b * d per row but needs a reorder copy around each tiny b x b
matmul (`butterfly.apply_factor`), and runs several times slower than its flop count.

Building the chunks (`BuildChunks`) goes level by level, lowest factor first: factor i's chunks
times the product so far (block diagonal), multiplying only the factor's nonzero b x b/2 pieces
(`_level`), so building the chunks of every projection of a UNet at once is a few calls a level.
On CPU the C++ kernels (`cpu.build`) do the same arithmetic one top chunk at a time.

    R = B_{m-1} ... B_1 B_0,   chunk_k(R) = chunk(B_top) blockdiag(chunks(B_.. ... B_0))

Shapes: blocks (m, d/b, b, b); chunks (d/c, c, c); rows (..., d).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import cpu


def factor_chunks(blocks: torch.Tensor, factor: int) -> torch.Tensor:
    """Factor i's blocks (d/b, b, b) as its dense diagonal chunks (d/c_i, c_i, c_i), c_i = b * 2^i.

    Block p of a chunk maps features (q, p, r) to (s, p, t) (the view of `butterfly.factor_view`)."""
    if factor == 0:
        return blocks
    b, pairs = blocks.shape[-1], 2**factor
    half = b // 2
    q = blocks.reshape(-1, pairs, 2, half, 2, half)  # (d/c_i, p, q, r, s, t)
    dense = blocks.new_zeros(q.shape[0], 2, pairs, half, 2, pairs, half)  # (d/c_i, q, p, r, s, p', t)
    dense.diagonal(dim1=2, dim2=5).copy_(q.permute(0, 2, 3, 4, 5, 1))  # p == p' only
    return dense.view(-1, b * pairs, b * pairs)


def factor_chunks_grad(grad: torch.Tensor, factor: int, block_size: int) -> torch.Tensor:
    """Inverse reading of `factor_chunks`: the block entries of dense chunk gradients, (d/b, b, b)."""
    if factor == 0:
        return grad
    pairs, half = 2**factor, block_size // 2
    g = grad.reshape(-1, 2, pairs, half, 2, pairs, half).diagonal(dim1=2, dim2=5)  # (d/c_i, q, r, s, t, p)
    return g.permute(0, 5, 1, 2, 3, 4).reshape(-1, block_size, block_size)


LEVEL_SLICE = 1 << 18  # numbers per pass of a level (1 MB of fp32): its scratch stays in cache


def _passes(n: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of the n chunks (size x size) of a level, one cache-sized pass each."""
    step = max(1, LEVEL_SLICE // (size * size))
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _block_halves(blocks: torch.Tensor, factor: int, lo: int, hi: int) -> torch.Tensor:
    """Factor i's blocks of chunks lo..hi, each cut by output half s: (chunk, s, p) x (q, r) x t,
    i.e. (chunks * 2 * 2^i, b, b/2). A small copy (the blocks are 1/2^i of a chunk's numbers)."""
    b, pairs = blocks.shape[-1], 2**factor
    half = b // 2
    q = blocks[factor, lo * pairs : hi * pairs].reshape(hi - lo, pairs, 2, half, 2, half)  # (k, p, q, r, s, t)
    return q.permute(0, 4, 1, 2, 3, 5).reshape(-1, b, half)


def _level_views(blocks: torch.Tensor, factor: int, below: torch.Tensor, lo: int, hi: int, scratch: torch.Tensor):
    """For chunks lo..hi of level `factor`: (A, B, T, D) with T = A @ B the level's nonzero numbers
    in `scratch` and D the view of T in `_diagonal`'s order."""
    b, small = blocks.shape[-1], below.shape[-1]
    half, k = b // 2, hi - lo
    groups = (b << factor) // 2 // small  # chunks of `below` per half chunk
    a = _block_halves(blocks, factor, lo, hi)  # (k s p, (q r), t)
    bm = below[lo * 2 * groups : hi * 2 * groups].reshape(a.shape[0], half, small)  # (k s p, t, j)
    t = scratch[: a.shape[0] * b * small].view(a.shape[0], b, small)  # (k s p, (q r), j)
    d = t.view(k, 2, groups, small // half, 2, half, small).permute(0, 4, 3, 5, 1, 6, 2)  # (k, q, p', r, s, j, g)
    return a, bm, t, d


def _diagonal(chunks: torch.Tensor, groups: int, half: int) -> torch.Tensor:
    """The numbers of level chunks (k, c, c) that can be nonzero: (k, q, p', r, s, j, g), row
    (q, g, p', r) and column (s, g, j); p = (g, p') pairs with the g-th chunk below in half s."""
    k, c = chunks.shape[0], chunks.shape[-1]
    small = c // 2 // groups
    view = chunks.view(k, 2, groups, small // half, half, 2, groups, small)
    return view.diagonal(dim1=2, dim2=6)


TINY_BMM = 400  # torch's CPU bmm runs matrices of fewer multiply-adds than this in a scalar loop


def _dense(blocks: torch.Tensor, factor: int, below: torch.Tensor) -> bool:
    """Whether level `factor` over `below` (chunks half as wide) runs as one dense c x c product per
    chunk: when its nonzero pieces, (b x b/2) @ (b/2 x c/2), are tiny (b = 8: the first level), a
    dense 16 x 16 batch is ~5x faster on CPU despite 4x the multiply-adds (measured)."""
    b, small = blocks.shape[-1], below.shape[-1]
    return 2 * small == b << factor and b * (b // 2) * small < TINY_BMM


def _block_diagonal(below: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Groups of k chunks (k n, c', c') as dense block-diagonal chunks (n, k c', k c')."""
    small = below.shape[-1]
    out = below.new_zeros(below.shape[0] // k, k, small, k, small)
    out.diagonal(dim1=1, dim2=3).copy_(below.view(-1, k, small, small).permute(0, 2, 3, 1))
    return out.view(-1, k * small, k * small)


MIN_CPU_CHUNK = 16


def padding(c: int, widths: Sequence[int], device: torch.device) -> int:
    """How many c x c chunks to rotate by as one block-diagonal chunk: on CPU, BLAS runs 16 x 16
    chunk matmuls about twice as fast as 8 x 8 ones although they multiply twice as many numbers
    (measured for 64-4096 tokens), so the chunks of m = 1 (c = b = 8) are paired. 1: as they are."""
    if device.type != "cpu" or c >= MIN_CPU_CHUNK or any(w % MIN_CPU_CHUNK for w in widths):
        return 1
    return MIN_CPU_CHUNK // c


class PadChunks(torch.autograd.Function):
    """Chunks (n, c, c) as block-diagonal chunks of k of them (n/k, k c, k c); backward keeps the
    gradients of the diagonal blocks (the rest of a padded chunk is no parameter)."""

    @staticmethod
    def forward(ctx, chunks: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        return _block_diagonal(chunks, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.k
        c = grad.shape[-1] // k
        blocks = grad.reshape(-1, k, c, k, c).diagonal(dim1=1, dim2=3)  # (n/k, c, c, k)
        return blocks.permute(0, 3, 1, 2).reshape(-1, c, c), None


def _level(blocks: torch.Tensor, factor: int, below: torch.Tensor) -> torch.Tensor:
    """Chunks of B_factor times the block-diagonal product `below` (its chunks, at most half as wide).

    Block p of the factor takes rows t of below's chunk in half s to rows (q, r) of its own block:
    out[(q, p, r), (s, j)] = sum_t Q_p[(q, r), (s, t)] below_s[(p, t), j]. So the level is one batched
    (b x b/2) @ (b/2 x c') matmul per (chunk, s, p), no zeros multiplied, then one reorder copy
    into the chunks, pass by pass."""
    if _dense(blocks, factor, below):
        return torch.bmm(factor_chunks(blocks[factor], factor), _block_diagonal(below))
    b, size = blocks.shape[-1], blocks.shape[-1] << factor
    n, groups = below.shape[0] * below.shape[-1] // size, size // 2 // below.shape[-1]
    out = (torch.zeros if groups > 1 else torch.empty)(n, size, size, dtype=below.dtype, device=below.device)
    scratch = below.new_empty(min(n, _passes(n, size)[0][1]) * size * size)
    for lo, hi in _passes(n, size):
        a, bm, t, d = _level_views(blocks, factor, below, lo, hi, scratch)
        torch.bmm(a, bm, out=t)
        _diagonal(out[lo:hi], groups, b // 2).copy_(d)
    return out


def _level_backward(blocks: torch.Tensor, factor: int, below: torch.Tensor, grad: torch.Tensor, grad_blocks):
    """dL/dbelow for out = _level(blocks, factor, below); dL/dblocks[factor] goes into `grad_blocks`."""
    if _dense(blocks, factor, below):
        grad_blocks[factor] = factor_chunks_grad(torch.bmm(grad, _block_diagonal(below).mT), factor, blocks.shape[-1])
        grad_pairs = torch.bmm(factor_chunks(blocks[factor], factor).mT, grad)  # (k, 2c', 2c')
        small = below.shape[-1]
        return grad_pairs.view(-1, 2, small, 2, small).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(below.shape)
    b, size, pairs = blocks.shape[-1], grad.shape[-1], 2**factor
    half, n, groups = b // 2, grad.shape[0], size // 2 // below.shape[-1]
    grad_below = torch.empty(below.shape, dtype=grad.dtype, device=grad.device)
    scratch = grad.new_empty(min(n, _passes(n, size)[0][1]) * size * size)
    for lo, hi in _passes(n, size):
        a, bm, t, d = _level_views(blocks, factor, below, lo, hi, scratch)
        d.copy_(_diagonal(grad[lo:hi], groups, half))  # dL/dT
        grad_a = torch.bmm(t, bm.mT).view(hi - lo, 2, pairs, 2, half, half)  # (k, s, p, q, r, t)
        grad_blocks[factor, lo * pairs : hi * pairs].view(hi - lo, pairs, 2, half, 2, half).copy_(grad_a.permute(0, 2, 3, 4, 1, 5))
        torch.bmm(a.mT, t, out=grad_below[lo * 2 * groups : hi * 2 * groups].view(bm.shape))
    return grad_below


class BuildChunks(torch.autograd.Function):
    """Diagonal chunks (d/c, c, c) of R = B_{top} ... B_{low} (the active `factors`, ascending).

    On CPU with factor 0 active, the C++ kernel (`cpu.build`) builds them one top chunk at a time
    and backward recomputes the products below in cache. Otherwise this saves the blocks and the
    products below the top level (together half the size of the result), so backward recomputes
    no product."""

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
        ctx.factors = factors
        chunks = cpu.build(blocks, factors)
        ctx.native = chunks is not None
        if ctx.native:
            ctx.save_for_backward(blocks)
            return chunks
        products = _products(blocks, factors)
        ctx.save_for_backward(blocks, *products[:-1])
        return products[-1].clone() if factors == (0,) else products[-1]  # (factor 0 alone is a view of blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        blocks, *products = ctx.saved_tensors
        factors = ctx.factors
        grad_blocks = torch.empty_like(blocks, memory_format=torch.contiguous_format)
        grad_blocks[[i for i in range(blocks.shape[0]) if i not in factors]] = 0
        if ctx.native:
            if cpu.build_backward(blocks, factors, grad, grad_blocks):
                return grad_blocks, None
            products = _products(blocks, factors)[:-1]  # the kernels were switched off since forward
        for j in range(len(factors) - 1, 0, -1):  # product_j = level(factor_j, product_{j-1})
            grad = _level_backward(blocks, factors[j], products[j - 1], grad, grad_blocks)
        grad_blocks[factors[0]] = factor_chunks_grad(grad, factors[0], blocks.shape[-1])
        return grad_blocks, None


def _products(blocks: torch.Tensor, factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Chunks of B_{f_0}, B_{f_1} B_{f_0}, ..., R: one per level (`_level`)."""
    products = [factor_chunks(blocks[factors[0]], factors[0])]  # (d/c_i, c_i, c_i)
    for i in factors[1:]:
        products.append(_level(blocks, i, products[-1]))
    return products


class GradientSlots:
    """One buffer for the gradient of every member's piece of a round's tensor (R's chunks, or the
    Cayley blocks), so that backward needs no cat.

    A member's backward writes its gradient straight into its slice (`claim`); `SplitChunks` then
    hands the whole buffer on (to `BuildChunks`, `Cayley`) and copies only what did not arrive in
    place (a gradient that autograd summed, or one computed elsewhere). Each slice is claimed once."""

    def __init__(self, chunks: torch.Tensor, sizes: Sequence[int], dim: int = 0):
        self.shape, self.dtype, self.device, self.dim = chunks.shape, chunks.dtype, chunks.device, dim
        self.bounds = [0]
        for size in sizes:
            self.bounds.append(self.bounds[-1] + size)
        self.buffer: torch.Tensor | None = None
        self.claimed: set[int] = set()

    def view(self, index: int) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.buffer.narrow(self.dim, self.bounds[index], self.bounds[index + 1] - self.bounds[index])

    def claim(self, index: int) -> torch.Tensor | None:
        """The slice for piece `index`'s gradient, or None when it was claimed before."""
        if index in self.claimed:
            return None
        self.claimed.add(index)
        return self.view(index)


class SplitChunks(torch.autograd.Function):
    """chunks.split(sizes, dim) whose pieces carry a `GradientSlots` slot (`piece.grad_slot`)."""

    @staticmethod
    def forward(ctx, chunks: torch.Tensor, sizes: tuple[int, ...], slots: GradientSlots):
        ctx.slots = slots
        return chunks.split(sizes, dim=slots.dim)

    @staticmethod
    def backward(ctx, *grads):
        slots = ctx.slots
        for index, grad in enumerate(grads):
            view = slots.view(index)
            if grad is None:
                view.zero_()
            elif grad.data_ptr() != view.data_ptr() or grad.stride() != view.stride():
                view.copy_(grad)
        buffer, slots.buffer = slots.buffer, None
        return buffer, None, None


def split(chunks: torch.Tensor, sizes: Sequence[int], dim: int = 0) -> list[torch.Tensor]:
    """The pieces of `chunks` (sizes along `dim`); with grad, each knows its gradient slot."""
    if not chunks.requires_grad:
        return list(chunks.split(list(sizes), dim=dim))
    slots = GradientSlots(chunks, sizes, dim)
    pieces = SplitChunks.apply(chunks, tuple(sizes), slots)
    for index, piece in enumerate(pieces):
        piece.grad_slot = (slots, index)
    return list(pieces)


def rotate(x: torch.Tensor, chunks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x R (or x R^T) for rows x (..., d) and R's chunks (d/c, c, c); no autograd graph.

    One batched c x c matmul that reads x's chunks in place (each a strided rows x c matrix),
    then one reorder copy back to rows. Measured against einsum (which copies x into its own
    layout first): 3-40% faster at every c in 8..64 and every SD 1.5 token count."""
    n, c, _ = chunks.shape
    mats = chunks.mT if transpose else chunks
    rows = x.reshape(-1, n, c).transpose(0, 1)  # (d/c, rows, c)
    mats = mats if mats.dtype == x.dtype else mats.to(x.dtype)
    return torch.bmm(rows, mats).transpose(0, 1).reshape(x.shape)


def chunks_grad(
    x: torch.Tensor, grad: torch.Tensor, n_chunks: int, transpose: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """dL/dchunks (d/c, c, c) for y = rotate(x, chunks, transpose) given dL/dy: per chunk x^T dy
    (into `out` when given: a gradient slot of `split`)."""
    c = x.shape[-1] // n_chunks
    xr = x.reshape(-1, n_chunks, c).transpose(0, 1)  # (d/c, rows, c)
    gr = grad.reshape(-1, n_chunks, c).transpose(0, 1)
    a, b = (gr.mT, xr) if transpose else (xr.mT, gr)
    if out is None:
        return torch.bmm(a, b)
    if out.dtype == x.dtype:
        return torch.bmm(a, b, out=out)
    return out.copy_(torch.bmm(a, b))


class ChunkRotate(torch.autograd.Function):
    """x R (or x R^T) by chunks, saving only x and the chunks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, chunks: torch.Tensor, transpose: bool) -> torch.Tensor:
        ctx.save_for_backward(x, chunks)
        ctx.transpose = transpose
        return rotate(x, chunks, transpose)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, chunks = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = rotate(grad, chunks, not ctx.transpose) if ctx.needs_input_grad[0] else None
        grad_chunks = None
        if ctx.needs_input_grad[1]:
            grad_chunks = chunks_grad(x, grad, chunks.shape[0], ctx.transpose).to(chunks.dtype)
        return grad_x, grad_chunks, None
