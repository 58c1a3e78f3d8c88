"""PEFT's fbd_cuda (a block-diagonal scatter) written in torch, so PEFT's BOFT runs its own m-factor code
path on CPU: PEFT builds R with that CUDA extension and, where it does not build, silently sets m = 1.
The benchmark uses it to time PEFT's BOFT as it is meant to run; the tests use it as their oracle."""

import torch


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
