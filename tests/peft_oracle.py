"""PEFT's BOFT as a test oracle, with its butterfly factors really in effect on CPU.

PEFT builds R with a CUDA extension (`fbd_cuda`, a block-diagonal scatter); when that does
not build (always on CPU) it warns and silently sets m = 1. We hand it the same operation
written in torch, so PEFT runs its own m-factor code path unchanged.
"""

import importlib.util
from pathlib import Path


_spec = importlib.util.spec_from_file_location(
    "peft_block_diag", Path(__file__).resolve().parents[1] / "benchmarks" / "peft_block_diag.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
TorchBlockDiag = _module.TorchBlockDiag  # one stand-in, shared with the benchmark

peft_boft_layer = __import__("peft.tuners.boft.layer", fromlist=["layer"])


def force_butterfly(monkeypatch):
    """Make PEFT believe its CUDA extension loaded, so boft_n_butterfly_factor is honoured."""
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", TorchBlockDiag)
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: TorchBlockDiag)


def peft_factor_count(model) -> int:
    """m as PEFT really uses it (the leading dim of its boft_R)."""
    shapes = {p.shape[0] for n, p in model.named_parameters() if n.endswith("boft_R.default")}
    assert len(shapes) == 1, shapes
    return shapes.pop()
