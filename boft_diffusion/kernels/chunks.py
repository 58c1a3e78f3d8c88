"""R as its diagonal chunks, the CPU path: build them from the Cayley blocks, rotate rows by them.

Every factor i mixes features only within chunks of b * 2^i, so R (of the active factors) is
block diagonal with chunks of c = b * 2^(top active factor). Rotating a row by R is then one
batched c x c matmul per chunk, d * c per row, which CPU BLAS runs near its peak; applying the
m factors one by one costs m * b * d per row but needs a reorder copy around each tiny b x b
matmul (`butterfly.apply_factor`), and runs several times slower than its flop count.

Building the chunks (`BuildChunks`) goes level by level, lowest factor first: factor i as dense
(c_i x c_i) chunks times the product so far, which is block diagonal at that level; one batched
matmul per level, so building the chunks of every projection of a UNet at once is a handful of calls.

    R = B_{m-1} ... B_1 B_0,   chunk(R) = chunk(B_top) blockdiag(chunks(B_.. ... B_0))

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


def _column_blocks(dense: torch.Tensor, small: int) -> torch.Tensor:
    """(d/c, c, c) -> (d/c, k, c, c'), k = c / c': column block j of each chunk."""
    n, c, _ = dense.shape
    return dense.view(n, c, c // small, small).transpose(1, 2)


def _times_block_diagonal(dense: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """dense (d/c, c, c) @ blockdiag(below) for below (d/c', c', c'): column block j of a chunk
    meets only below's j-th chunk, so k matmuls of c x c' (half the work of an embedded one)."""
    n, c, _ = dense.shape
    small = below.shape[-1]
    out = torch.matmul(_column_blocks(dense, small), below.view(n, c // small, small, small))  # (d/c, k, c, c')
    return out.transpose(1, 2).reshape(n, c, c)


class BuildChunks(torch.autograd.Function):
    """Diagonal chunks (d/c, c, c) of R = B_{top} ... B_{low} (the active `factors`, ascending).

    Saves the blocks and the products below the top level (together half the size of the
    result), so backward recomputes only the dense factor chunks (copies), no matmul."""

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
        products = []
        for i in factors:
            dense = factor_chunks(blocks[i], i)  # (d/c_i, c_i, c_i)
            products.append(dense if not products else _times_block_diagonal(dense, products[-1]))
        ctx.save_for_backward(blocks, *products[:-1])
        ctx.factors = factors
        return products[-1].clone() if factors == (0,) else products[-1]  # (factor 0 alone is a view of blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        blocks, *products = ctx.saved_tensors
        factors = ctx.factors
        b = blocks.shape[-1]
        grad = grad.to(blocks.dtype)  # under autocast the incoming gradient may be bf16/fp16; blocks are fp32
        grad_blocks = torch.zeros_like(blocks)
        for j in range(len(factors) - 1, 0, -1):  # product_j = dense_j @ blockdiag(product_{j-1})
            i, below = factors[j], products[j - 1]
            n, c, _ = grad.shape
            small = below.shape[-1]
            below4 = below.view(n, c // small, small, small)  # (d/c, k, c', c')
            grad4 = _column_blocks(grad, small)  # (d/c, k, c, c')
            grad_dense = torch.matmul(grad4, below4.mT).transpose(1, 2).reshape(n, c, c)
            grad_blocks[i] = factor_chunks_grad(grad_dense, i, b)
            dense = factor_chunks(blocks[i], i)
            grad = torch.matmul(_column_blocks(dense, small).mT, grad4).reshape(-1, small, small)  # (d/c', c', c')
        grad_blocks[factors[0]] = factor_chunks_grad(grad, factors[0], b)
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
