"""glibc malloc tuned for training on CPU.

Each step frees and re-allocates the same activations. glibc serves blocks above its mmap threshold
(128 KiB, adapting up to 32 MiB) with fresh mappings and returns freed heap tops to the kernel, so
every step touches new pages, each a page fault (~4 us on a VM: ~4000 a step, 7% of the tiny model's
training step). Keeping freed memory for reuse removes them; PyTorch's
CPU performance guide gets the same from jemalloc or tcmalloc. Other allocators are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from (reused) heap memory
TRIM_THRESHOLD = 1 << 30  # freed memory kept for reuse before any is returned to the kernel


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; True when they were set (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
