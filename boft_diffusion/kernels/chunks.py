"""R as its diagonal chunks, the CPU path: build them from the Cayley blocks, rotate rows by them.

Every factor i mixes features only within chunks of b * 2^i, so R (of the active factors) is
block diagonal with chunks of c = b * 2^(top active factor). Rotating a row by R is then one
batched c x c matmul per chunk, d * c per row, which CPU BLAS runs near its peak; applying the
m factors one by one costs m * b * d per row but needs a reorder copy around each tiny b x b
matmul (`butterfly.apply_factor`), and runs several times slower than its flop count.

Building the chunks (`BuildChunks`) goes level by level, lowest factor first: factor i as dense
(c_i x c_i) chunks times the product so far, embedded block-diagonally; one batched matmul per
level, so building the chunks of every projection of a UNet at once is a handful of calls.

    R = B_{m-1} ... B_1 B_0,   chunk_k(R) = chunk(B_top) embed(chunk(B_.. ... B_0))

Shapes: blocks (m, d/b, b, b); chunks (d/c, c, c); rows (..., d).
"""

from __future__ import annotations

from typing import Sequence

import torch


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


def embed(chunks: torch.Tensor, size: int) -> torch.Tensor:
    """(d/c', c', c') -> block diagonal (d/c, c, c), c = size (a multiple of c')."""
    small = chunks.shape[-1]
    k = size // small
    out = chunks.new_zeros(chunks.shape[0] // k, k, small, k, small)  # (d/c, k, c', k, c')
    out.diagonal(dim1=1, dim2=3).copy_(chunks.view(-1, k, small, small).permute(0, 2, 3, 1))
    return out.view(-1, size, size)


def unembed(grad: torch.Tensor, small: int) -> torch.Tensor:
    """The diagonal c' x c' blocks of (d/c, c, c): (d/c', c', c')."""
    k = grad.shape[-1] // small
    g = grad.view(-1, k, small, k, small).diagonal(dim1=1, dim2=3)  # (d/c, c', c', k)
    return g.permute(0, 3, 1, 2).reshape(-1, small, small)


def factor_halves(blocks: torch.Tensor, factor: int) -> torch.Tensor:
    """Factor i's dense chunks split by output half s: (2 * d/c_i, c_i, c_i/2), [chunk, s] = F[:, s half].

    Times a block-diagonal pair of c_i/2 chunks this is the next level's product with no
    embedded zeros: F [P_0 0; 0 P_1] = [F[:, 0 half] P_0, F[:, 1 half] P_1]."""
    b, pairs = blocks.shape[-1], 2**factor
    half = b // 2
    q = blocks.reshape(-1, pairs, 2, half, 2, half)  # (d/c_i, p, q, r, s, t)
    out = blocks.new_zeros(q.shape[0], 2, 2, pairs, half, pairs, half)  # (d/c_i, s, q, p, r, p', t)
    out.diagonal(dim1=3, dim2=5).copy_(q.permute(0, 4, 2, 3, 5, 1))  # p == p' only
    return out.view(-1, b * pairs, b * pairs // 2)


def factor_halves_grad(grad: torch.Tensor, factor: int, block_size: int) -> torch.Tensor:
    """Block entries (d/b, b, b) of gradients shaped like `factor_halves`."""
    pairs, half = 2**factor, block_size // 2
    g = grad.reshape(-1, 2, 2, pairs, half, pairs, half).diagonal(dim1=3, dim2=5)  # (d/c_i, s, q, r, t, p)
    return g.permute(0, 5, 2, 3, 1, 4).reshape(-1, block_size, block_size)


def _level(blocks: torch.Tensor, factor: int, below: torch.Tensor) -> torch.Tensor:
    """Chunks of B_factor times the block-diagonal product `below` (its chunks)."""
    size = blocks.shape[-1] << factor
    if factor > 0 and below.shape[-1] * 2 == size:
        halves = torch.bmm(factor_halves(blocks[factor], factor), below)  # (2 d/c, c, c/2)
        return halves.view(-1, 2, size, size // 2).transpose(1, 2).reshape(-1, size, size)
    return torch.bmm(factor_chunks(blocks[factor], factor), embed(below, size))


def _level_backward(blocks: torch.Tensor, factor: int, below: torch.Tensor, grad: torch.Tensor):
    """(dL/dblocks[factor] (d/b, b, b), dL/dbelow) for out = _level(blocks, factor, below)."""
    b, size, small = blocks.shape[-1], grad.shape[-1], below.shape[-1]
    if factor > 0 and small * 2 == size:
        halves = factor_halves(blocks[factor], factor)
        g = grad.view(-1, size, 2, small).transpose(1, 2).reshape(-1, size, small)  # (2 d/c, c, c/2)
        return factor_halves_grad(torch.bmm(g, below.mT), factor, b), torch.bmm(halves.mT, g)
    dense = factor_chunks(blocks[factor], factor)
    grad_blocks = factor_chunks_grad(torch.bmm(grad, embed(below, size).mT), factor, b)
    return grad_blocks, unembed(torch.bmm(dense.mT, grad), small)


class BuildChunks(torch.autograd.Function):
    """Diagonal chunks (d/c, c, c) of R = B_{top} ... B_{low} (the active `factors`, ascending).

    Saves the blocks and the products below the top level (together half the size of the
    result), so backward recomputes only the cheap dense copies of the factors, no product."""

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
        products = [factor_chunks(blocks[factors[0]], factors[0])]  # (d/c_i, c_i, c_i)
        for i in factors[1:]:
            products.append(_level(blocks, i, products[-1]))
        ctx.save_for_backward(blocks, *products[:-1])
        ctx.factors = factors
        return products[-1].clone() if factors == (0,) else products[-1]  # (factor 0 alone is a view of blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        blocks, *products = ctx.saved_tensors
        factors = ctx.factors
        grad_blocks = torch.zeros_like(blocks)
        for j in range(len(factors) - 1, 0, -1):  # product_j = level(factor_j, product_{j-1})
            grad_blocks[factors[j]], grad = _level_backward(blocks, factors[j], products[j - 1], grad)
        grad_blocks[factors[0]] = factor_chunks_grad(grad, factors[0], blocks.shape[-1])
        return grad_blocks, None


def rotate(x: torch.Tensor, chunks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x R (or x R^T) for rows x (..., d) and R's chunks (d/c, c, c); no autograd graph."""
    n, c, _ = chunks.shape
    rows = x.reshape(-1, n, c)  # (rows, d/c, c)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    mats = chunks.mT if transpose else chunks
    torch.bmm(rows.transpose(0, 1), mats.to(x.dtype), out=out.transpose(0, 1))  # (d/c, rows, c) per chunk
    return out.view(x.shape)


def chunks_grad(x: torch.Tensor, grad: torch.Tensor, n_chunks: int, transpose: bool = False) -> torch.Tensor:
    """dL/dchunks (d/c, c, c) for y = rotate(x, chunks, transpose) given dL/dy: per chunk x^T dy."""
    c = x.shape[-1] // n_chunks
    xr = x.reshape(-1, n_chunks, c).transpose(0, 1)  # (d/c, rows, c)
    gr = grad.reshape(-1, n_chunks, c).transpose(0, 1)
    return torch.bmm(gr.mT, xr) if transpose else torch.bmm(xr.mT, gr)


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
