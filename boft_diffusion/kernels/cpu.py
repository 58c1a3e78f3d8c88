"""C++ CPU kernels for the per-step parameter pipeline: Cayley blocks and the rotation chunks.

Why: every training step turns all skew parameters into rotation chunks (`butterfly.Cayley`, then
`chunks.BuildChunks`), a fixed cost whatever the batch. In PyTorch that is dozens of small ops over
8 x 8 blocks whose intermediates pass through memory: ~85 ms of SD 1.5's step on one core, as much as
the whole 5% a user would notice next to LoRA at small latents. The same arithmetic as loops per
block, and the chunk build one top chunk at a time (`cpu_kernels.cpp`), keeps them in registers and
cache and runs it ~3x faster.

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
from typing import Optional

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
