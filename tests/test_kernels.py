"""The fused Triton butterfly kernel against the PyTorch path, and the dispatch between them.

On CPU the Triton kernels run in Triton's interpreter: `kernels` loads a second copy of the
kernel module with TRITON_INTERPRET=1 set while its `@triton.jit` decorators run, so these
tests work whatever was imported before them. Sizes stay small (the interpreter runs each
program in numpy). CUDA tests are marked `gpu` and run the compiled kernels.
"""

import logging

import pytest
import torch

from boft_diffusion import kernels
from boft_diffusion.butterfly import cayley, factor_order, num_skew_params, rotate_rows

from butterfly_reference import dense_rotation

try:
    import triton  # noqa: F401  (imported before TRITON_INTERPRET is set: the kernels cope)

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (d, b, m, active mask or None, leading dims): chunk widths G = 16 .. 128, masks that skip the
# widest factor (smaller chunk) and inner ones, m = 1 (plain OFT), rows not a tile multiple.
CASES = [
    (64, 4, 3, None, (5, 7)),
    (64, 8, 2, (True, False), (37,)),
    (32, 2, 4, None, (3, 11)),
    (128, 8, 4, (False, True, True, False), (2, 3, 5)),
    (48, 16, 1, None, (19,)),
    (64, 8, 4, (True, False, True, True), (70,)),
]
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_blocks(d, b, m, scale=0.6, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randn(m, d // b, num_skew_params(b), generator=gen) * scale
    return cayley(packed, b).to(device)


def assert_near(actual, expected, tol):
    """max |a - e| <= tol * max(1, max |e|): relative for large values, absolute near zero."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


_interpreter_problem = []


def interpreter_problem():
    """Why this Triton's interpreter cannot run the kernels, or None. Some (Triton 3.6 with
    numpy 2) fail on `range(n)` over a runtime scalar, which the backward kernels use."""
    if not _interpreter_problem:
        from triton.runtime.errors import InterpreterError

        try:
            kernels.rotate_backward(torch.randn(3, 16), torch.randn(3, 16), make_blocks(16, 4, 2), (1, 0), False, True)
            _interpreter_problem.append(None)
        except InterpreterError as err:
            import triton

            _interpreter_problem.append(f"Triton {triton.__version__}'s interpreter fails on these kernels: {err}"[:300])
    return _interpreter_problem[0]


@pytest.fixture
def interpret(monkeypatch):
    """Force the Triton path and let it use the interpreter on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)


def check_against_pytorch(d, b, m, mask, lead, transpose, dtype, device, need_blocks_grad=True):
    blocks = make_blocks(d, b, m, device=device, seed=d + b + m)
    order = factor_order(m, mask, transpose)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, d, generator=gen).to(device)
    g = torch.randn(*lead, d, generator=gen).to(device)
    # reference in fp32 from the low-precision inputs, compared in the kernel's dtype
    ref_y = kernels.rotate_pytorch(x.to(dtype).float(), blocks, order, transpose)
    ref_gx, ref_gb = kernels.rotate_backward_pytorch(
        x.to(dtype).float(), g.to(dtype).float(), blocks, order, transpose, True
    )
    y = kernels.rotate(x.to(dtype), blocks, order, transpose)
    assert_near(y, ref_y.to(dtype), TOL[dtype])
    gx, gb = kernels.rotate_backward(x.to(dtype), g.to(dtype), blocks, order, transpose, need_blocks_grad)
    assert_near(gx, ref_gx.to(dtype), TOL[dtype])
    if need_blocks_grad:
        assert_near(gb, ref_gb, TOL[dtype])
        for i in range(m):
            if i not in order:
                assert (gb[i] == 0).all()
    else:
        assert gb is None


# ------------------------------------------------------------------------------ interpreter (CPU)


@needs_triton
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d,b,m,mask,lead", CASES)
def test_interpreter_matches_pytorch_fp32(interpret, d, b, m, mask, lead, transpose):
    check_against_pytorch(d, b, m, mask, lead, transpose, torch.float32, "cpu")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreter_low_precision(interpret, dtype):
    check_against_pytorch(64, 8, 3, None, (2, 21), False, dtype, "cpu")


@needs_triton
def test_interpreter_wide_chunk_bf16(interpret):
    """b=16, m=4: one 128 x 128 chunk matrix (fp32 stops at 64 and says so)."""
    check_against_pytorch(256, 16, 4, None, (33,), True, torch.bfloat16, "cpu")
    blocks = make_blocks(256, 16, 4)
    with pytest.raises(RuntimeError, match="float32 chunk"):
        kernels.rotate(torch.randn(3, 256), blocks, factor_order(4, None, False), False)


@needs_triton
def test_interpreter_without_blocks_grad(interpret):
    check_against_pytorch(64, 4, 3, None, (9,), False, torch.float32, "cpu", need_blocks_grad=False)


@needs_triton
def test_interpreter_matches_dense_rotation(interpret):
    """Independent of butterfly.py's reshapes: x R with R multiplied out from permutation matrices."""
    d, b, m = 64, 4, 4
    blocks = make_blocks(d, b, m)
    x = torch.randn(10, d)
    dense = dense_rotation(blocks)
    assert_near(kernels.rotate(x, blocks, factor_order(m, None, False), False).double(), x.double() @ dense, 1e-5)
    assert_near(kernels.rotate(x, blocks, factor_order(m, None, True), True).double(), x.double() @ dense.T, 1e-5)


@needs_triton
def test_interpreter_noncontiguous_and_empty(interpret):
    d, b, m = 64, 8, 3
    blocks = make_blocks(d, b, m)
    order = factor_order(m, None, False)
    wide = torch.randn(6, 2 * d)
    for x in (wide[:, :d], wide[:, ::2], torch.randn(d, 7).t()):  # row stride 2d; stride 2; transposed
        assert_near(kernels.rotate(x, blocks, order, False), kernels.rotate_pytorch(x, blocks, order, False), 1e-5)
        g = torch.randn(x.shape).t().contiguous().t()
        gx, gb = kernels.rotate_backward(x, g, blocks, order, False, True)
        rgx, rgb = kernels.rotate_backward_pytorch(x, g, blocks, order, False, True)
        assert_near(gx, rgx, 1e-5)
        assert_near(gb, rgb, 1e-5)
    empty = torch.randn(0, 3, d)
    assert kernels.rotate(empty, blocks, order, False).shape == empty.shape
    gx, gb = kernels.rotate_backward(empty, empty, blocks, order, False, True)
    assert gx.shape == empty.shape and (gb == 0).all()


@needs_triton
def test_interpreter_autograd_function(interpret):
    """rotate/rotate_backward inside an autograd.Function give rotate_rows' gradients."""

    class Rotate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, blocks, order, transpose):
            ctx.save_for_backward(x, blocks)
            ctx.order, ctx.transpose = order, transpose
            return kernels.rotate(x, blocks, order, transpose)

        @staticmethod
        def backward(ctx, grad):
            x, blocks = ctx.saved_tensors
            gx, gb = kernels.rotate_backward(x, grad, blocks, ctx.order, ctx.transpose, ctx.needs_input_grad[1])
            return gx, gb, None, None

    d, b, m = 32, 4, 3
    packed = (torch.randn(m, d // b, num_skew_params(b)) * 0.5).requires_grad_()
    x = torch.randn(4, 5, d, requires_grad=True)
    w = torch.randn(4, 5, d)
    mask = (True, False, True)
    order = tuple(factor_order(m, mask, False))
    (Rotate.apply(x, cayley(packed, b), order, False) * w).sum().backward()
    got = (x.grad.clone(), packed.grad.clone())
    x.grad = packed.grad = None
    (rotate_rows(x, cayley(packed, b), mask, False) * w).sum().backward()
    assert_near(got[0], x.grad, 1e-5)
    assert_near(got[1], packed.grad, 1e-5)


# ------------------------------------------------------------------------------ dispatch


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(kernels, "_logged", set())
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


def test_cpu_runs_pytorch_and_says_so(fresh_log, caplog):
    blocks = make_blocks(32, 4, 2)
    x = torch.randn(3, 32)
    with caplog.at_level(logging.INFO, logger="boft_diffusion.kernels"):
        y = kernels.rotate(x, blocks, (1, 0), False)
        kernels.rotate(x, blocks, (1, 0), False)
    assert torch.equal(y, kernels.rotate_pytorch(x, blocks, (1, 0), False))
    lines = [r.getMessage() for r in caplog.records if r.name == "boft_diffusion.kernels"]
    assert lines == ["butterfly kernel: pytorch (cpu)"]  # once, not per call
    assert kernels.kernel_path("cpu", torch.float32, 4) == "pytorch (cpu)"
    assert kernels.kernel_path("cpu", torch.float64, 8) == "pytorch (cpu)"


def test_force_pytorch(fresh_log, monkeypatch, caplog):
    monkeypatch.setenv(kernels.ENV_VAR, "pytorch")
    blocks = make_blocks(32, 4, 2)
    x = torch.randn(3, 32)
    with caplog.at_level(logging.INFO, logger="boft_diffusion.kernels"):
        gx, gb = kernels.rotate_backward(x, x, blocks, (1, 0), False, True)
    assert "butterfly kernel: pytorch (BOFT_KERNEL=pytorch)" in caplog.text
    assert kernels.kernel_path("cuda", torch.bfloat16) == "pytorch (BOFT_KERNEL=pytorch)"


def test_force_triton_on_cpu_needs_interpreter(fresh_log, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.rotate(torch.randn(3, 32), make_blocks(32, 4, 2), (1, 0), False)
    assert kernels.kernel_path("cpu", torch.float32).startswith("unavailable")


def test_bad_mode_is_an_error(fresh_log, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="BOFT_KERNEL"):
        kernels.rotate(torch.randn(3, 32), make_blocks(32, 4, 2), (1, 0), False)


@needs_triton
def test_forced_triton_refuses_unsupported_shape(interpret):
    blocks = make_blocks(36, 6, 2)  # b = 6: not a power of two
    with pytest.raises(RuntimeError, match="power of two"):
        kernels.rotate(torch.randn(2, 36), blocks, (1, 0), False)


def test_no_active_factors_is_identity(fresh_log):
    blocks = make_blocks(32, 4, 2)
    x = torch.randn(3, 32)
    assert kernels.rotate(x, blocks, (), False) is x
    gx, gb = kernels.rotate_backward(x, x, blocks, (), False, True)
    assert gx is x and (gb == 0).all()


# ------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d,b,m,mask,lead", CASES[:4] + [(1280, 8, 4, None, (2, 300))])
def test_cuda_matches_pytorch(fresh_log, d, b, m, mask, lead, transpose, dtype):
    check_against_pytorch(d, b, m, mask, lead, transpose, dtype, "cuda")


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_cuda_wide_chunk_and_fallbacks(fresh_log, caplog):
    check_against_pytorch(512, 16, 4, None, (4, 77), False, torch.bfloat16, "cuda")
    with caplog.at_level(logging.INFO, logger="boft_diffusion.kernels"):
        x = torch.randn(5, 64, device="cuda")
        kernels.rotate(x, make_blocks(64, 8, 2, device="cuda"), (1, 0), False)
        kernels.rotate(x.double(), make_blocks(64, 8, 2, device="cuda"), (1, 0), False)
        kernels.rotate(torch.randn(5, 36, device="cuda"), make_blocks(36, 6, 2, device="cuda"), (1, 0), False)
    assert "butterfly kernel: triton (cuda, float32)" in caplog.text
    assert "butterfly kernel: pytorch (cuda, float64 not in float32/float16/bfloat16)" in caplog.text
    assert "block size 6 is not a power of two" in caplog.text
    assert kernels.kernel_path("cuda", torch.bfloat16) == "triton (cuda, bfloat16)"
