"""The C++ CPU kernels (kernels.cpu) equal the PyTorch path they replace, and fall back to it cleanly.

BOFT_KERNEL=pytorch is the switch to the reference, so every comparison below runs the same call
twice in one process. Float64 agrees to rounding, float32 to a few ulps (different summation order).
"""

import logging

import pytest
import torch

from boft_diffusion import butterfly
from boft_diffusion.butterfly import Cayley, factor_order, num_skew_params
from boft_diffusion.kernels import chunks as chunk_ops
from boft_diffusion.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no working C++ compiler on this machine")


def packed(m, d, b, seed=0, dtype=torch.float64, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d // b, num_skew_params(b), generator=g, dtype=torch.float64) * scale).to(dtype)


def pipeline(p, b, factors, g):
    """Chunks and dL/dpacked of Cayley + BuildChunks for dL/dchunks = g."""
    p = p.detach().requires_grad_(True)
    chunks = chunk_ops.BuildChunks.apply(Cayley.apply(p, b), factors)
    return chunks.detach(), torch.autograd.grad(chunks, p, g)[0]


def both_paths(monkeypatch, fn):
    native = fn()
    monkeypatch.setenv("BOFT_KERNEL", "pytorch")
    reference = fn()
    monkeypatch.delenv("BOFT_KERNEL")
    return native, reference


# (d, b, m, active): compiled sizes (b = 4, 8, 16), run-time sized loops (b = 6, 12, 32: half or chunk
# widths without a specialisation), skipped factors (levels whose chunks below are narrower than half).
CASES = [
    (64, 8, 4, None), (256, 8, 4, None), (48, 4, 3, None), (128, 16, 3, None), (96, 6, 3, None),
    (96, 12, 2, None), (128, 32, 2, None), (64, 8, 4, (True, False, True, True)),
    (64, 8, 4, (False, True, False, True)), (32, 4, 4, (True, False, False, True)), (24, 3, 1, None),
]


@pytest.mark.parametrize("d,b,m,active", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_cayley_and_chunk_build_equal_the_pytorch_path(monkeypatch, d, b, m, active, dtype, tol):
    p = packed(m, d, b, dtype=dtype)
    factors = tuple(sorted(factor_order(m, active, False)))
    c = butterfly.chunk_size(b, factors)
    g = torch.randn(d // c, c, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    (chunks, grad), (ref_chunks, ref_grad) = both_paths(monkeypatch, lambda: pipeline(p, b, factors, g))
    torch.testing.assert_close(chunks, ref_chunks, atol=tol, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=tol * ref_grad.abs().max().item(), rtol=0)


@pytest.mark.parametrize("d,b,m,active", [(64, 8, 4, None), (96, 6, 3, None), (64, 8, 4, (False, True, False, True))])
def test_gradients_through_the_kernels_are_exact(d, b, m, active):
    p = packed(m, d, b).requires_grad_(True)
    factors = tuple(sorted(factor_order(m, active, False)))
    assert torch.autograd.gradcheck(lambda q: chunk_ops.BuildChunks.apply(Cayley.apply(q, b), factors), (p,))


def test_threads_split_the_work_without_changing_a_bit():
    """Each thread owns whole chunks and blocks: the same arithmetic in the same order."""
    p = packed(4, 4096, 8, dtype=torch.float32)
    g = torch.randn(4096 // 64, 64, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pipeline(p, 8, (0, 1, 2, 3), g)
        torch.set_num_threads(3)
        three = pipeline(p, 8, (0, 1, 2, 3), g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


@pytest.mark.parametrize("scale", [0.5, 5.0, 50.0])
def test_cayley_blocks_are_as_orthogonal_as_the_pytorch_paths(monkeypatch, scale):
    """Large skew entries make I + S badly conditioned; both eliminate without pivoting alike."""
    p = packed(1, 512, 8, dtype=torch.float32, scale=scale)
    native, reference = both_paths(monkeypatch, lambda: Cayley.apply(p, 8))
    error = [(q @ q.mT - torch.eye(8)).abs().max().item() for q in (native, reference)]
    assert error[0] <= 1.5 * error[1] + 1e-6


def test_what_the_kernels_do_not_take_goes_to_the_pytorch_path():
    half = packed(2, 16, 8, dtype=torch.float32).to(torch.bfloat16)
    assert cpu.cayley(half, 8) is None
    blocks = Cayley.apply(packed(4, 64, 8), 8)
    assert cpu.build(blocks.to(torch.bfloat16), (0, 1)) is None
    assert cpu.build(blocks, (1, 2)) is None and cpu.build(blocks, (0,)) is None  # factor 0 off; nothing to build
    assert cpu.build(blocks, (0, 2)) is not None


def test_kernels_switched_off_between_forward_and_backward_still_give_the_gradient(monkeypatch):
    p = packed(4, 128, 8)
    g = torch.randn(2, 64, 64, dtype=torch.float64)
    want = pipeline(p, 8, (0, 1, 2, 3), g)[1]
    q = p.detach().requires_grad_(True)
    chunks = chunk_ops.BuildChunks.apply(Cayley.apply(q, 8), (0, 1, 2, 3))
    monkeypatch.setenv("BOFT_KERNEL", "pytorch")
    torch.testing.assert_close(torch.autograd.grad(chunks, q, g)[0], want, atol=1e-12, rtol=0)


def test_the_library_is_built_once_per_source_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("BOFT_DIFFUSION_CACHE", str(tmp_path))
    first = cpu._build(cpu._compiler())
    assert first.parent == tmp_path / "cpu_kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu._build(cpu._compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [f.name for f in first.parent.iterdir()] == [first.name]  # no partial files left behind


def test_a_missing_compiler_falls_back_to_pytorch_with_a_logged_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BOFT_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_state", {})
    with caplog.at_level(logging.INFO, logger="boft_diffusion.kernels"):
        assert cpu.library() is None
    assert "no-such-compiler" in caplog.text and "PyTorch path" in caplog.text
    p = packed(4, 64, 8)
    g = torch.randn(1, 64, 64, dtype=torch.float64)
    fallback = pipeline(p, 8, (0, 1, 2, 3), g)
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.delenv("CXX")
    native = pipeline(p, 8, (0, 1, 2, 3), g)
    torch.testing.assert_close(fallback, native, atol=1e-12, rtol=0)


def test_a_corrupt_cached_library_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("BOFT_DIFFUSION_CACHE", str(tmp_path))
    path = cpu._build(cpu._compiler())
    path.write_bytes(b"not a shared library")
    monkeypatch.setattr(cpu, "_state", {})
    assert cpu.library() is not None
    assert path.read_bytes() != b"not a shared library"


rows_kernel = pytest.mark.skipif(not cpu.rows_supported(torch.float32, 8), reason="the rows kernel needs AVX2 and FMA")


def blocks_of(m, d, seed=0, extra=0):
    """fp32 Cayley blocks (m, d/8, 8, 8) as a slice of a wider group's blocks when extra > 0 (the
    layout `layers._compute` hands each member: b x b blocks contiguous, factors strided)."""
    group = Cayley.apply(packed(m, d + extra, 8, seed=seed, dtype=torch.float32), 8).detach()
    return group[:, extra // 8 :]


# (d, m, active, rows): every factor alone and in gaps, top chunks from 8 to 256 wide, row counts
# around the kernel's tiles of 32 (0, 1, odd, several tiles).
ROWS_CASES = [
    (64, 4, None, 33), (320, 4, None, 70), (768, 4, None, 77), (64, 1, None, 5), (256, 6, None, 3),
    (64, 4, (True, False, True, True), 32), (64, 4, (False, True, False, True), 1), (128, 3, (False, False, True), 40),
    (64, 2, None, 0),
]


@rows_kernel
@pytest.mark.parametrize("d,m,active,rows", ROWS_CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_rows_kernel_equals_the_pytorch_path(d, m, active, rows, transpose):
    from boft_diffusion import kernels

    blocks = blocks_of(m, d, extra=16)
    order = tuple(factor_order(m, active, transpose))
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(2, rows, d, generator=g), torch.randn(2, rows, d, generator=g)
    ref_x, ref_blocks = kernels.rotate_backward_pytorch(x, grad, blocks, order, transpose, True)
    torch.testing.assert_close(cpu.rotate_rows(x, blocks, order, transpose), kernels.rotate_pytorch(x, blocks, order, transpose),
                               atol=2e-6, rtol=0)
    grad_x, grad_blocks = cpu.rotate_rows_backward(x, grad, blocks, order, transpose, True, True)
    torch.testing.assert_close(grad_x, ref_x, atol=2e-6, rtol=0)
    torch.testing.assert_close(grad_blocks, ref_blocks, atol=2e-6 * max(1.0, ref_blocks.abs().max().item()), rtol=0)
    no_x, only_blocks = cpu.rotate_rows_backward(x, grad, blocks, order, transpose, False, True)
    assert no_x is None and torch.equal(only_blocks, grad_blocks)
    only_x, no_blocks = cpu.rotate_rows_backward(x, grad, blocks, order, transpose, True, False)
    assert no_blocks is None and torch.equal(only_x, grad_x)


@rows_kernel
def test_rows_kernel_writes_a_gradient_slot_and_zeroes_the_idle_factors():
    """The backward overwrites (never adds to) the slot it is given: stale numbers must not survive,
    factors switched off get zeros, and so does everything when there are no rows."""
    blocks, order = blocks_of(4, 128), (3, 1)
    x, grad = torch.randn(40, 128), torch.randn(40, 128)
    want = cpu.rotate_rows_backward(x, grad, blocks, order, False, False, True)[1]
    slot = torch.full((4, 16, 8, 8), float("nan"))
    assert cpu.rotate_rows_backward(x, grad, blocks, order, False, False, True, blocks_out=slot)[1] is slot
    assert torch.equal(slot, want) and not slot[[0, 2]].any()
    empty = torch.empty(0, 128)
    slot.fill_(float("nan"))
    cpu.rotate_rows_backward(empty, empty, blocks, order, False, False, True, blocks_out=slot)
    assert not slot.any()


@rows_kernel
def test_rows_kernel_threads_split_the_work_without_changing_a_bit():
    """Each thread owns whole top chunks; calls of fewer than 4M numbers stay on one thread."""
    blocks = blocks_of(4, 1024)
    x, grad = torch.randn(4200, 1024), torch.randn(4200, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (cpu.rotate_rows(x, blocks, (3, 2, 1, 0), False), *cpu.rotate_rows_backward(x, grad, blocks, (3, 2, 1, 0), False, True, True))
        torch.set_num_threads(3)
        three = (cpu.rotate_rows(x, blocks, (3, 2, 1, 0), False), *cpu.rotate_rows_backward(x, grad, blocks, (3, 2, 1, 0), False, True, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, three))


def test_what_the_rows_kernel_does_not_take_goes_elsewhere(monkeypatch):
    from boft_diffusion import kernels

    x = torch.randn(3, 64)
    for dtype, b in ((torch.float64, 8), (torch.bfloat16, 8), (torch.float32, 4), (torch.float32, 16)):
        blocks = Cayley.apply(packed(2, 64, b, dtype=torch.float32), b).to(dtype)
        assert not cpu.rows_supported(dtype, b)
        assert cpu.rotate_rows(x.to(dtype), blocks, (1, 0), False) is None
        assert not kernels.fused_kernel_runs("cpu", dtype, b)
    blocks64 = Cayley.apply(packed(2, 64, 8), 8)  # fp64 blocks (fp64 skew) on fp32 rows: the PyTorch path casts
    torch.testing.assert_close(kernels.rotate(x, blocks64, (1, 0), False), kernels.rotate_pytorch(x, blocks64, (1, 0), False))
    grad_x, grad_blocks = kernels.rotate_backward(x, x, blocks64, (1, 0), False, True)
    assert grad_x.dtype == torch.float32 and grad_blocks.dtype == torch.float64
    monkeypatch.setenv("BOFT_KERNEL", "pytorch")
    assert not kernels.fused_kernel_runs("cpu", torch.float32, 8)
    assert kernels.kernel_path("cpu", torch.float32, 8) == "pytorch (BOFT_KERNEL=pytorch)"
