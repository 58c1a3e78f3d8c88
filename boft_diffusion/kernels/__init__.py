"""Which implementation rotates rows by a butterfly R: the fused Triton kernel or the PyTorch path.

    rotate(x, blocks, order, transpose)                                   -> x R (or x R^T)
    rotate_backward(x, grad, blocks, order, transpose, need_blocks_grad)  -> (grad_x, grad_blocks | None)

Both take rows x (..., d) (any leading dims, contiguous or not), blocks (m, d/b, b, b) fp32
Cayley blocks and `order`, the active factors in application order (`butterfly.factor_order`).
The Triton kernel runs when x is on CUDA, its dtype is fp32/fp16/bf16, Triton imports and the
shape fits (`triton_butterfly.plan_problem`); on CPU the C++ kernel (`cpu.rotate_rows`: fp32, b = 8,
AVX2) applies all factors to a tile of rows in cache, the way the Triton kernel does on GPU;
otherwise the PyTorch path, which is the reference.
The choice is logged once per (path, reason) on the "boft_diffusion.kernels" logger; it never
changes the rotation itself (m, b and the active factors are always what the caller passed).

BOFT_KERNEL=auto (default) | pytorch | triton forces a path. `triton` on a CPU tensor runs
Triton's interpreter, and only when TRITON_INTERPRET=1 is set (slow: for tests); otherwise,
and for any shape the kernel cannot take, it raises instead of falling back. `pytorch` also
switches off the C++ CPU kernels that build the Cayley blocks and rotation chunks (`cpu.py`).
"""

import importlib.util
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from ..butterfly import apply_factor, factor_grad
from . import cpu

logger = logging.getLogger("boft_diffusion.kernels")

ENV_VAR = "BOFT_KERNEL"
MODES = ("auto", "pytorch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_logged: set = set()
_modules: dict = {}


# ------------------------------------------------------------------------------ PyTorch path


def rotate_pytorch(x: torch.Tensor, blocks: torch.Tensor, order: Sequence[int], transpose: bool) -> torch.Tensor:
    """The reference: one reshape + batched block matmul per factor (`butterfly.apply_factor`)."""
    for i in order:
        x = apply_factor(x, blocks[i], i, transpose)
    return x


def rotate_backward_pytorch(
    x: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor, order: Sequence[int], transpose: bool,
    need_blocks_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Recompute each factor's input from x, then walk back: B_i is orthogonal, so grad B_i^T undoes it."""
    block_size = blocks.shape[-1]
    inputs = []
    for i in order:
        inputs.append(x)
        x = apply_factor(x, blocks[i], i, transpose)
    grad_blocks = torch.zeros_like(blocks) if need_blocks_grad else None
    for i, x_i in zip(reversed(order), reversed(inputs)):
        if grad_blocks is not None:
            grad_blocks[i] = factor_grad(x_i, grad, i, block_size, transpose).to(blocks.dtype)
        grad = apply_factor(grad, blocks[i], i, not transpose)
    return grad, grad_blocks


# ------------------------------------------------------------------------------ choosing


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(MODES)}.")
    return mode


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_module(interpret: bool):
    """The kernel module; for CPU tensors a second copy whose kernels were decorated under
    TRITON_INTERPRET=1 (Triton picks compiled vs interpreted when `@triton.jit` runs), so
    interpreted and compiled kernels can live in one process."""
    key = "interpret" if interpret else "compiled"
    if key not in _modules:
        if not interpret:
            from . import triton_butterfly

            _modules[key] = triton_butterfly
        else:
            name = __name__ + "._triton_butterfly_interpreted"
            path = os.path.join(os.path.dirname(__file__), "triton_butterfly.py")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            saved = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                spec.loader.exec_module(module)
            finally:
                if saved is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = saved
            sys.modules[name] = module
            _modules[key] = module
    return _modules[key]


def _triton_missing() -> Optional[str]:
    if "triton" in _modules:
        return _modules["triton"]
    try:
        import triton  # noqa: F401

        _modules["triton"] = None
    except ImportError as err:  # also a broken install
        _modules["triton"] = f"triton not importable ({err.__class__.__name__})"
    return _modules["triton"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device_problem(device: torch.device, dtype: torch.dtype, forced: bool) -> Optional[str]:
    """Why the Triton path cannot run on this device/dtype (shape aside), or None."""
    if device.type != "cuda" and not (forced and _interpret_requested()):
        if forced:
            return f"{device.type} tensors need CUDA, or TRITON_INTERPRET=1 for Triton's (slow) interpreter"
        return device.type
    if dtype not in TRITON_DTYPES:
        return f"{device.type}, {_dtype_name(dtype)} not in float32/float16/bfloat16"
    return _triton_missing()


def _choose(x: torch.Tensor, blocks: torch.Tensor, order: Sequence[int]) -> tuple[str, str]:
    """(path, reason) for this call; raises when BOFT_KERNEL=triton cannot be honoured."""
    mode = _mode()
    if mode == "pytorch":
        return "pytorch", f"{ENV_VAR}=pytorch"
    forced = mode == "triton"
    if (not forced and x.device.type == "cpu" and blocks.device.type == "cpu" and blocks.dtype == x.dtype
            and cpu.rows_supported(x.dtype, blocks.shape[-1])):
        return "cpu", "cpu, C++"
    problem = _device_problem(x.device, x.dtype, forced)
    if problem is None:
        kernels = _triton_module(x.device.type != "cuda")
        shape = kernels.plan_problem(x.shape[-1], blocks.shape[-1], tuple(order), x.dtype)
        if shape is not None:
            problem = f"{x.device.type}, {shape}"
    if problem is not None:
        if forced:
            raise RuntimeError(f"{ENV_VAR}=triton, but the Triton kernel cannot run: {problem}.")
        return "pytorch", problem
    where = f"{x.device.type}, {_dtype_name(x.dtype)}"
    if x.device.type != "cuda":
        where += ", interpreter"
    return "triton", (f"{ENV_VAR}=triton, " if forced else "") + where


def _log_once(path: str, reason: str) -> None:
    if (path, reason) not in _logged:
        _logged.add((path, reason))
        logger.info("butterfly kernel: %s (%s)", path, reason)


def kernel_path(device, dtype: torch.dtype, block_size: Optional[int] = None) -> str:
    """What a rotation of this device/dtype (and block size, when known) runs on, for display:
    "triton (cuda, bfloat16)", "c++ (cpu, float32, b=8)", "pytorch (cpu)", ... Other shapes are
    not known here: a layer whose shape the kernel cannot take still falls back (and logs why)
    when it runs."""
    device = torch.device(device)
    try:
        mode = _mode()
    except ValueError as err:
        return f"invalid ({err})"
    if mode == "pytorch":
        return f"pytorch ({ENV_VAR}=pytorch)"
    if mode == "auto" and device.type == "cpu" and cpu.rows_supported(dtype, block_size or 8):
        where = f"cpu, {_dtype_name(dtype)}, b={block_size or 8}"
        return f"c++ ({where})" if block_size else f"c++ ({where}; pytorch for other b)"
    problem = _device_problem(device, dtype, mode == "triton")
    if problem is not None:
        return f"unavailable ({ENV_VAR}=triton, but {problem})" if mode == "triton" else f"pytorch ({problem})"
    where = f"{device.type}, {_dtype_name(dtype)}" + (", interpreter" if device.type != "cuda" else "")
    return "triton (" + (f"{ENV_VAR}=triton, " if mode == "triton" else "") + where + ")"


def fused_kernel_runs(device, dtype: torch.dtype, block_size: int) -> bool:
    """Whether rotations of rows of `dtype` on `device` take a fused kernel (Triton, shape
    permitting, or the C++ one on CPU): callers that can also rotate another way
    (`layers.ButterflyRotation`) choose by this."""
    mode = _mode()
    if mode != "auto":
        return mode == "triton"
    if torch.device(device).type == "cpu":
        return cpu.rows_supported(dtype, block_size)
    return torch.device(device).type == "cuda" and _triton_missing() is None


# ------------------------------------------------------------------------------ entry points


def rotate(x: torch.Tensor, blocks: torch.Tensor, order: Sequence[int], transpose: bool) -> torch.Tensor:
    """x R (transpose=False) or x R^T, for the factors in `order`. No autograd graph is built
    on the Triton path: wrap it in an autograd.Function (layers.ButterflyRotate) to train."""
    order = order if type(order) is tuple else tuple(int(i) for i in order)
    if not order:  # identity, whatever the path
        return x
    path, reason = _choose(x, blocks, order)
    _log_once(path, reason)
    if path == "cpu":
        return cpu.rotate_rows(x, blocks, order, bool(transpose))
    if path == "pytorch":
        return rotate_pytorch(x, blocks, order, transpose)
    kernels = _triton_module(x.device.type != "cuda")
    return kernels.rotate(x, blocks.detach().float().contiguous(), order, bool(transpose))


def rotate_backward(
    x: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor, order: Sequence[int], transpose: bool,
    need_blocks_grad: bool, need_x_grad: bool = True, blocks_grad_out: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of y = rotate(x, blocks, order, transpose) given dL/dy = grad: (dL/dx in x's
    dtype, dL/dblocks in blocks' dtype (m, d/b, b, b) or None). Factors not in `order` get 0.
    Without `need_x_grad` dL/dx may come back None (the C++ path then skips its last pass); the
    C++ path writes dL/dblocks into `blocks_grad_out` when given (a gradient slot), the others
    ignore it (their caller copies)."""
    order = order if type(order) is tuple else tuple(int(i) for i in order)
    if not order:
        return grad, (torch.zeros_like(blocks) if need_blocks_grad else None)
    path, reason = _choose(x, blocks, order)
    _log_once(path, reason)
    if path == "cpu":
        return cpu.rotate_rows_backward(x, grad.to(x.dtype), blocks, order, bool(transpose), need_x_grad,
                                        need_blocks_grad, blocks_grad_out)
    if path == "pytorch":
        return rotate_backward_pytorch(x, grad, blocks, order, transpose, need_blocks_grad)
    kernels = _triton_module(x.device.type != "cuda")
    grad_x, grad_blocks = kernels.rotate_backward(
        x, grad, blocks.detach().float().contiguous(), order, bool(transpose), bool(need_blocks_grad)
    )
    if grad_blocks is not None:
        grad_blocks = grad_blocks.to(blocks.dtype)
    return grad_x, grad_blocks


__all__ = [
    "rotate",
    "rotate_backward",
    "kernel_path",
    "fused_kernel_runs",
    "rotate_pytorch",
    "rotate_backward_pytorch",
    "ENV_VAR",
]
