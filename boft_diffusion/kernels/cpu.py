"""C++ CPU kernels: Cayley blocks, the rotation chunks, and rows times the butterfly factors.

Why: every training step turns all skew parameters into Cayley blocks (`butterfly.Cayley`), a fixed
cost whatever the batch. In PyTorch that is dozens of small ops over 8 x 8 blocks whose intermediates
pass through memory: a large part of the 5% a user would notice next to LoRA at small latents. The
same arithmetic as loops per block (`cpu_kernels.cpp`) keeps them in registers and runs ~3x faster.
Rotating rows then takes one of two routes: R's dense diagonal chunks (`chunks.BuildChunks`, built
one top chunk at a time in cache, then one BLAS matmul per chunk: c multiply-adds a feature), or,
for fp32 with b = 8 on a CPU with AVX2 and FMA, `rotate_rows`: the m factors applied to a tile of
rows in cache, m * b multiply-adds a feature and no chunks to build or differentiate (the CPU
counterpart of the Triton kernel; ~2x faster forward than the chunk matmul at SD 1.5 sizes, and
the only cheap route for m >= 5, whose chunks grow to 128+ wide).

The source is compiled on first use with the system's C++ compiler (`$CXX`, else c++/g++/clang++;
about 10 s) into a cache folder keyed by the source, the flags, the compiler and the CPU
($BOFT_DIFFUSION_CACHE, else $XDG_CACHE_HOME or ~/.cache, then `boft_diffusion/`), and loaded with
ctypes, no torch headers. Where no compiler works, or with BOFT_KERNEL=pytorch, the PyTorch path runs:
the same numbers to float rounding (tests hold the two together), only slower; the reason is logged
once on the "boft_diffusion.kernels" logger. Each function returns None when it does not apply
(not a CPU tensor, not fp32/fp64, no library), and the caller runs its PyTorch code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger("boft_diffusion.kernels")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17", "-pthread")
TUNED = ("-march=native",)  # tried first; dropped if the compiler refuses it
COMPILE_TIMEOUT_S = 300
SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None once tried


def _compiler() -> Optional[str]:
    named = os.environ.get("CXX", "").strip()
    if named:
        return shutil.which(named) or named
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """What a -march=native build depends on: a cache shared across machines must not mix CPUs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            lines = [line for line in info if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("BOFT_DIFFUSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "boft_diffusion"
    )
    return Path(root) / "cpu_kernels"


def _build(compiler: str) -> Path:
    """The compiled library for this source, compiler and CPU: cached, else compiled (atomically)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    errors = []
    for flags in (TUNED + FLAGS, FLAGS):
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_identity().encode(),
                        f"{sys.platform} {platform.machine()}".encode()])
        ).hexdigest()[:16]
        target = cache_dir() / f"cpu_kernels-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        done = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
        if done.returncode == 0:
            os.replace(partial, target)  # a concurrent process compiling the same file loses nothing
            return target
        partial.unlink(missing_ok=True)
        errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    raise RuntimeError("; ".join(errors))


def _load() -> Optional[ctypes.CDLL]:
    compiler = _compiler()
    if compiler is None:
        logger.info("No C++ compiler found (set CXX): the Cayley blocks and rotation chunks are built by the "
                    "PyTorch path on CPU (same results, slower training steps).")
        return None
    try:
        path = _build(compiler)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a cached file cut short or overwritten: build it again
            path.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning("Could not build the CPU kernels with %s (%s): the PyTorch path builds the Cayley blocks and "
                       "rotation chunks instead (same results, slower training steps). Set CXX to a working C++ "
                       "compiler, or BOFT_DIFFUSION_CACHE to a writable folder.", compiler, err)
        return None
    pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in SUFFIXES.values():
        getattr(lib, f"boft_cayley_forward_{suffix}").argtypes = [pointer, pointer, size, integer, integer]
        getattr(lib, f"boft_cayley_backward_{suffix}").argtypes = [pointer, pointer, pointer, size, integer, integer]
        getattr(lib, f"boft_build_forward_{suffix}").argtypes = [pointer, size, pointer, integer, integer, size,
                                                                 pointer, integer]
        getattr(lib, f"boft_build_backward_{suffix}").argtypes = [pointer, size, pointer, integer, integer, size,
                                                                  pointer, pointer, integer]
    lib.boft_rows_supported.argtypes = [integer]
    lib.boft_rows_forward_f32.argtypes = [pointer, size, size, pointer, size, pointer, integer, integer, integer,
                                          pointer, integer]
    lib.boft_rows_backward_f32.argtypes = [pointer, pointer, size, size, pointer, size, pointer, integer, integer,
                                           integer, pointer, pointer, size, integer]
    logger.info("CPU kernels loaded from %s", path)
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (no compiler, build failed, or BOFT_KERNEL=pytorch)."""
    from . import _mode  # the package's switch; imported here because the package imports this module's callers

    if _mode() == "pytorch":
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def _function(name: str, *tensors: torch.Tensor):
    """lib.boft_<name>_<dtype> when every tensor is a CPU tensor of one fp32/fp64 dtype, else None."""
    dtype = tensors[0].dtype
    if dtype not in SUFFIXES or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return None
    lib = library()
    return None if lib is None else getattr(lib, f"boft_{name}_{SUFFIXES[dtype]}")


def cayley(packed: torch.Tensor, block_size: int) -> Optional[torch.Tensor]:
    """`butterfly.Cayley` forward: packed (..., b(b-1)/2) -> Q (..., b, b)."""
    run = _function("cayley_forward", packed)
    if run is None:
        return None
    packed = packed.detach().contiguous()
    out = packed.new_empty(*packed.shape[:-1], block_size, block_size)
    run(packed.data_ptr(), out.data_ptr(), math.prod(packed.shape[:-1]), block_size, torch.get_num_threads())
    return out


def cayley_backward(blocks: torch.Tensor, grad: torch.Tensor) -> Optional[torch.Tensor]:
    """`butterfly.Cayley` backward: dL/dpacked (..., b(b-1)/2) from Q and dL/dQ, both (..., b, b)."""
    run = _function("cayley_backward", blocks, grad)
    if run is None:
        return None
    b = blocks.shape[-1]
    blocks, grad = blocks.detach().contiguous(), grad.detach().contiguous()
    out = blocks.new_empty(*blocks.shape[:-2], b * (b - 1) // 2)
    run(blocks.data_ptr(), grad.data_ptr(), out.data_ptr(), math.prod(blocks.shape[:-2]), b, torch.get_num_threads())
    return out


def build(blocks: torch.Tensor, factors: tuple[int, ...]) -> Optional[torch.Tensor]:
    """`chunks.BuildChunks` forward for factors (0, ...) (at least two): chunks (d/c, c, c) of R."""
    run = _function("build_forward", blocks)
    if run is None or len(factors) < 2 or factors[0] != 0:
        return None
    blocks = blocks.detach().contiguous()
    b, c = blocks.shape[-1], blocks.shape[-1] << factors[-1]
    n_top = blocks.shape[1] * b // c
    out = blocks.new_empty(n_top, c, c)
    run(blocks.data_ptr(), blocks[0].numel(), _ints(factors), len(factors), b, n_top, out.data_ptr(),
        torch.get_num_threads())
    return out


def build_backward(blocks: torch.Tensor, factors: tuple[int, ...], grad: torch.Tensor, grad_blocks: torch.Tensor) -> bool:
    """`chunks.BuildChunks` backward: dL/dblocks of the active factors into `grad_blocks` (contiguous,
    like blocks; the other factors are left alone). False when the kernels do not apply."""
    run = _function("build_backward", blocks, grad)
    if run is None or len(factors) < 2 or factors[0] != 0:
        return False
    blocks, grad = blocks.detach().contiguous(), grad.detach().contiguous()
    run(blocks.data_ptr(), blocks[0].numel(), _ints(factors), len(factors), blocks.shape[-1], grad.shape[0],
        grad.data_ptr(), grad_blocks.data_ptr(), torch.get_num_threads())
    return True


def _ints(values: tuple[int, ...]):
    return (ctypes.c_int * len(values))(*values)


def rows_supported(dtype: torch.dtype, block_size: int) -> bool:
    """Whether `rotate_rows` runs for this dtype and b (fp32, b = 8, a build with AVX2 and FMA).
    BOFT_KERNEL is its callers' to honour (`kernels`): this is asked several times a projection."""
    if dtype != torch.float32:
        return False
    lib = _state["lib"] if "lib" in _state else library()
    if lib is None:
        return False
    supported = _state.setdefault("rows", {})  # asked per projection call: remember the answer
    if block_size not in supported:
        supported[block_size] = bool(lib.boft_rows_supported(block_size))
    return supported[block_size]


def _rows_apply(x: torch.Tensor, blocks: torch.Tensor, order: Sequence[int]) -> bool:
    return (x.device.type == "cpu" and blocks.device.type == "cpu" and blocks.dtype == x.dtype and len(order) > 0
            and rows_supported(x.dtype, blocks.shape[-1]))


@functools.lru_cache(maxsize=None)
def _order_array(order: tuple[int, ...]):
    return _ints(order)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1])
    return rows if rows.is_contiguous() else rows.contiguous()


def _blocks_laid_out(blocks: torch.Tensor) -> bool:
    """Whether (m, n, b, b) has contiguous, evenly spaced b x b blocks, what the kernel reads and writes
    (a slice along n, such as a member's share of a round's blocks, keeps that)."""
    b = blocks.shape[-1]
    return blocks.stride()[1:] == (b * b, b, 1)


def _with_contiguous_blocks(blocks: torch.Tensor) -> torch.Tensor:
    blocks = blocks.detach()
    return blocks if _blocks_laid_out(blocks) else blocks.contiguous()


def rotate_rows(x: torch.Tensor, blocks: torch.Tensor, order: tuple[int, ...], transpose: bool) -> Optional[torch.Tensor]:
    """x R (or x R^T) for rows x (..., d) and blocks (m, d/b, b, b), the factors of `order` applied in
    that order, all in one pass over each tile of rows (`kernels.rotate`); None when not supported."""
    if not _rows_apply(x, blocks, order):
        return None
    rows, blocks = _rows(x), _with_contiguous_blocks(blocks)
    out = torch.empty_like(rows)
    _state["lib"].boft_rows_forward_f32(rows.data_ptr(), rows.shape[0], rows.shape[1], blocks.data_ptr(),
                                        blocks.stride(0), _order_array(order), len(order), blocks.shape[-1],
                                        int(transpose), out.data_ptr(), torch.get_num_threads())
    return out.view(x.shape)


def rotate_rows_backward(x: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor, order: tuple[int, ...],
                         transpose: bool, need_x: bool, need_blocks: bool, blocks_out: Optional[torch.Tensor] = None):
    """(dL/dx or None, dL/dblocks (m, d/b, b, b) or None) for `rotate_rows`, the latter written into
    `blocks_out` when given (a gradient slot: b x b blocks contiguous); None when not supported."""
    if grad.dtype != x.dtype or grad.device.type != "cpu" or not _rows_apply(x, blocks, order):
        return None
    rows, blocks = _rows(x), _with_contiguous_blocks(blocks)
    g = _rows(grad)
    grad_x = torch.empty_like(rows) if need_x else None
    grad_blocks = None
    if need_blocks:
        usable = (blocks_out is not None and blocks_out.shape == blocks.shape and blocks_out.dtype == blocks.dtype
                  and _blocks_laid_out(blocks_out))
        grad_blocks = blocks_out if usable else torch.empty(blocks.shape, dtype=blocks.dtype)
        idle = [i for i in range(blocks.shape[0]) if i not in order] if rows.shape[0] else range(blocks.shape[0])
        for i in idle:  # the kernel writes the blocks of the factors in `order` (when there are rows)
            grad_blocks[i].zero_()
    _state["lib"].boft_rows_backward_f32(
        rows.data_ptr(), g.data_ptr(), rows.shape[0], rows.shape[1], blocks.data_ptr(), blocks.stride(0),
        _order_array(order), len(order), blocks.shape[-1], int(transpose),
        None if grad_x is None else grad_x.data_ptr(), None if grad_blocks is None else grad_blocks.data_ptr(),
        0 if grad_blocks is None else grad_blocks.stride(0), torch.get_num_threads(),
    )
    return (None if grad_x is None else grad_x.view(x.shape)), grad_blocks
