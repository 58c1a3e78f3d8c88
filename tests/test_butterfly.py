"""The butterfly math: orthogonality, fast path == dense reference (forward and backward), validation."""

import pytest
import torch
from butterfly_reference import butterfly_permutation, dense_rotation

from boft_diffusion.butterfly import (
    cayley,
    max_factors,
    num_skew_params,
    packed_from_matrix,
    resolve_blocks,
    rotate_rows,
    skew_from_packed,
)
from boft_diffusion.layers import ButterflyRotate

# (d, b, m): m = 1 is OFT; the last column of each d is the densest valid m.
SHAPES = [(16, 4, 1), (16, 4, 3), (24, 3, 1), (48, 4, 3), (64, 8, 4), (32, 2, 5), (64, 16, 3)]


def random_blocks(d, b, m, seed=0, std=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randn(m, d // b, num_skew_params(b), generator=g, dtype=dtype) * std
    return packed, cayley(packed, b)


@pytest.mark.parametrize("d,b,m", SHAPES)
def test_every_rotation_is_orthogonal(d, b, m):
    _, blocks = random_blocks(d, b, m)
    assert blocks.dtype == torch.float32
    eye_b = torch.eye(b)
    assert (blocks.transpose(-1, -2) @ blocks - eye_b).abs().max() < 1e-5
    rotation = rotate_rows(torch.eye(d), blocks)  # rows of I R = R
    assert (rotation.T @ rotation - torch.eye(d)).abs().max() < 1e-5


def test_densest_factor_count_makes_R_dense_and_fewer_does_not():
    d, b = 64, 4
    m = max_factors(d, b)
    assert m == 5  # 1 + log2(64 / 4)
    _, blocks = random_blocks(d, b, m)
    assert (dense_rotation(blocks).abs() > 0).all()
    assert (dense_rotation(blocks[: m - 1]).abs() > 0).float().mean() == 0.5


def test_cayley_is_exact_and_fp32_for_half_params():
    packed = torch.randn(3, num_skew_params(4)).half()
    q = cayley(packed, 4)
    assert q.dtype == torch.float32
    s = skew_from_packed(packed.float(), 4)
    eye = torch.eye(4)
    torch.testing.assert_close(q @ (eye + s), eye - s, atol=1e-6, rtol=0)
    assert torch.equal(cayley(torch.zeros(2, 6), 4), torch.eye(4).expand(2, 4, 4))


def test_packing_round_trips_and_reads_skew_part():
    a = torch.randn(5, 6, 6)
    packed = packed_from_matrix(a)
    torch.testing.assert_close(skew_from_packed(packed, 6), 0.5 * (a - a.transpose(-1, -2)))


def test_permutation_matches_the_papers_description():
    # chunk of b*2^i = 16 features, half-blocks of 2, reordered evens-then-odds.
    perm = butterfly_permutation(16, 4, 2)
    assert perm.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
    assert torch.equal(butterfly_permutation(16, 4, 0), torch.arange(16))


@pytest.mark.parametrize("d,b,m", SHAPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_fast_application_equals_dense_reference(d, b, m, transpose):
    _, blocks = random_blocks(d, b, m)
    x = torch.randn(2, 5, d)
    dense = dense_rotation(blocks).float()
    expected = x @ (dense.T if transpose else dense)
    torch.testing.assert_close(rotate_rows(x, blocks, transpose=transpose), expected, atol=1e-5, rtol=0)
    order = tuple(range(m)) if transpose else tuple(range(m - 1, -1, -1))
    torch.testing.assert_close(ButterflyRotate.apply(x, blocks, order, transpose), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("d,b,m", [(16, 4, 3), (24, 3, 1), (32, 2, 4)])
def test_backward_equals_dense_reference(d, b, m):
    packed, _ = random_blocks(d, b, m)
    x = torch.randn(7, d)
    weights = torch.randn(7, d)

    fast_packed = packed.clone().requires_grad_(True)
    fast_x = x.clone().requires_grad_(True)
    order = tuple(range(m - 1, -1, -1))
    (ButterflyRotate.apply(fast_x, cayley(fast_packed, b), order, False) * weights).sum().backward()

    ref_packed = packed.double().requires_grad_(True)
    ref_x = x.double().requires_grad_(True)
    ((ref_x @ dense_rotation(cayley(ref_packed, b))) * weights.double()).sum().backward()

    torch.testing.assert_close(fast_x.grad, ref_x.grad.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_packed.grad, ref_packed.grad.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, True), (False, False, True)])
def test_gradcheck_float64(transpose, mask):
    d, b, m = 16, 4, 3
    packed = (torch.randn(m, d // b, num_skew_params(b), dtype=torch.float64) * 0.5).requires_grad_(True)
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    order = tuple(i for i in (range(m) if transpose else range(m - 1, -1, -1)) if mask[i])
    assert torch.autograd.gradcheck(
        lambda x, p: ButterflyRotate.apply(x, cayley(p, b), order, transpose), (x, packed)
    )


def test_inactive_factors_equal_zeroed_factors():
    d, b, m = 32, 4, 3
    packed, blocks = random_blocks(d, b, m)
    x = torch.randn(4, d)
    zeroed = packed.clone()
    zeroed[2] = 0
    expected = rotate_rows(x, cayley(zeroed, b))
    torch.testing.assert_close(rotate_rows(x, blocks, active=[True, True, False]), expected, atol=1e-6, rtol=0)


def test_resolve_blocks_accepts_valid_and_names_fixes():
    assert resolve_blocks(320, 4, block_size=8) == (8, 40)
    assert resolve_blocks(320, 2, block_num=40) == (8, 40)
    with pytest.raises(ValueError, match=r"down.attn1.to_q: block_size=12 with m=4.*d=320.*valid block_size for m=4: \[.*8.*\]"):
        resolve_blocks(320, 4, block_size=12, layer="down.attn1.to_q")
    with pytest.raises(ValueError, match=r"with b=8 use m <= 4"):
        resolve_blocks(320, 5, block_size=8, layer="x")
    with pytest.raises(ValueError, match=r"block_num=7 does not divide.*d=320"):
        resolve_blocks(320, 1, block_num=7, layer="x")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_blocks(320, 1, block_size=8, block_num=40)
    with pytest.raises(ValueError, match=r"b even when m > 1"):
        resolve_blocks(30, 2, block_size=3, layer="x")


@pytest.mark.parametrize("d,b,m", [(64, 8, 4), (48, 4, 3), (24, 3, 1)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("active", [None, (True, False, True)])
def test_chunk_matrices_equal_the_factored_rotation(d, b, m, transpose, active):
    from boft_diffusion.butterfly import chunk_matrices, factor_order, rotate_by_chunks

    if active is not None and len(active) != m:
        active = None
    order = factor_order(m, active, transpose)
    packed, _ = random_blocks(d, b, m)
    x = torch.randn(5, 3, d)
    weights = torch.randn(5, 3, d)
    p1, p2 = packed.clone().requires_grad_(True), packed.clone().requires_grad_(True)
    fast = rotate_by_chunks(x, chunk_matrices(cayley(p1, b), order, transpose))
    ref = rotate_rows(x, cayley(p2, b), active, transpose)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    (fast * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=0)


def test_layer_picks_the_fused_kernel_else_chunks_and_factors_when_chunks_grow(monkeypatch):
    from boft_diffusion.kernels import cpu
    from boft_diffusion.layers import ButterflyRotation

    cpu_device = torch.device("cpu")
    small = ButterflyRotation(320, 320, 8, 4)  # c = 64
    assert small.use_chunks(1024, cpu_device) != cpu.rows_supported(torch.float32, 8)  # the C++ rows kernel when it runs
    assert small.use_chunks(1024, cpu_device, torch.float64) and small.use_chunks(1024, cpu_device, torch.bfloat16)
    assert ButterflyRotation(320, 320, 4, 4).use_chunks(1024, cpu_device)  # b = 4: c = 32, no fused kernel
    dense = ButterflyRotation(256, 256, 2, 8)  # c = 256 = d: a dense matmul would lose
    assert not dense.use_chunks(1024, cpu_device)
    monkeypatch.setenv("BOFT_KERNEL", "pytorch")
    assert small.use_chunks(1024, cpu_device)


def test_cayley_is_right_for_every_block_size_on_two_threads():
    """torch 2.13 + MKL on CPU: batched solves of blocks >= ~150 with 2 threads return garbage or
    raise 'Pivots given to lu_solve...' (repro: eye(160).expand(2, 160, 160)); SD 1.5 with
    block_num=8 has b = 160. cayley must be right anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eye = torch.eye(160).expand(2, 160, 160)
        assert torch.equal(cayley(torch.zeros(2, num_skew_params(160)), 160), eye)
        g = torch.Generator().manual_seed(0)
        for b in [*range(1, 9), 31, 32, 40, 63, 64, 80, 96, 127, 128, 144, 150, 152, 159, 160, 161, 192, 256, 320]:
            packed = 0.1 * torch.randn(2, 3, num_skew_params(b), generator=g)
            q, s, i = cayley(packed, b), skew_from_packed(packed, b), torch.eye(b)
            assert q.shape == (2, 3, b, b)
            assert ((i + s) @ q - (i - s)).abs().max() < 1e-4, b
            assert (q @ q.mT - i).abs().max() < 1e-4, b
    finally:
        torch.set_num_threads(threads)
