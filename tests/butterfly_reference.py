"""Dense reference for BOFT's R, built literally from the paper's definition (tests only).

Independent of `boft_diffusion.butterfly`'s reshapes: explicit permutation matrices and a
block-diagonal matrix per factor, multiplied out. Slow (d x d) on purpose.
"""

import torch


def butterfly_permutation(features: int, block_size: int, factor: int) -> torch.Tensor:
    """Gather indices of P_i: chunks of b * 2^i, half-blocks of b/2 reordered evens-then-odds."""
    if factor == 0:
        return torch.arange(features)
    chunk, half = block_size * 2**factor, block_size // 2
    halves = chunk // half
    order = list(range(0, halves, 2)) + list(range(1, halves, 2))
    within = torch.cat([torch.arange(h * half, (h + 1) * half) for h in order])
    return torch.cat([start + within for start in range(0, features, chunk)])


def permutation_matrix(gather: torch.Tensor) -> torch.Tensor:
    """P with P[k, gather[k]] = 1, so (P v)[k] = v[gather[k]]."""
    n = gather.numel()
    mat = torch.zeros(n, n, dtype=torch.float64)
    mat[torch.arange(n), gather] = 1.0
    return mat


def dense_rotation(blocks: torch.Tensor) -> torch.Tensor:
    """R = B_{m-1} ... B_0 with B_i = P_i blockdiag(Q_i) P_i^T, from blocks (m, d/b, b, b), float64."""
    m, n, b, _ = blocks.shape
    d = n * b
    rotation = torch.eye(d, dtype=torch.float64)
    for i in range(m):
        p = permutation_matrix(butterfly_permutation(d, b, i))
        factor = p @ torch.block_diag(*blocks[i].double()) @ p.T
        rotation = factor @ rotation
    return rotation
