"""PEFT's BOFT as a test oracle, with its butterfly factors really in effect on CPU.

PEFT builds R with a CUDA extension (`fbd_cuda`, a block-diagonal scatter); when that does
not build (always on CPU) it warns and silently sets m = 1. We hand it the same operation
written in torch, so PEFT runs its own m-factor code path unchanged.
"""

import torch

peft_boft_layer = __import__("peft.tuners.boft.layer", fromlist=["layer"])


class TorchBlockDiag:
    """Drop-in for PEFT's fbd_cuda: (N, D, b, b) blocks <-> (N, D*b, D*b) block-diagonal matrices."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, b, _ = blocks.shape
        idx = torch.arange(d, device=grad.device)
        full = grad.view(n, d, b, d, b)  # (N, D, b, D, b)
        return [full[:, idx, :, idx, :].permute(1, 0, 2, 3).contiguous()]


def force_butterfly(monkeypatch):
    """Make PEFT believe its CUDA extension loaded, so boft_n_butterfly_factor is honoured."""
    monkeypatch.setattr(peft_boft_layer, "_FBD_CUDA", TorchBlockDiag)
    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: TorchBlockDiag)


def peft_factor_count(model) -> int:
    """m as PEFT really uses it (the leading dim of its boft_R)."""
    shapes = {p.shape[0] for n, p in model.named_parameters() if n.endswith("boft_R.default")}
    assert len(shapes) == 1, shapes
    return shapes.pop()
