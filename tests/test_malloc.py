"""training.malloc: freed memory is reused instead of faulted in afresh at every step."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate, touch and free a 64 MiB tensor 20 times (after 10 that let the heap settle); print the page
# faults those 20 cost.
PROGRAM = """
import resource, sys, torch
from training import malloc
if sys.argv[1] == "tuned":
    assert malloc.keep_freed_memory()
for _ in range(10):
    torch.ones(1 << 24).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(1 << 24).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_removes_the_page_faults_of_repeated_allocations():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT, check=True, capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    pages = 20 * (64 << 20) // 4096
    assert faults("default") > pages // 2  # each 64 MiB block is a fresh mapping: a fault per page
    assert faults("tuned") < pages // 10
