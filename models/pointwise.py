"""1x1 convolution on channels-last maps that always runs as oneDNN's GEMM on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d"]

# oneDNN's 1x1 convolution beats PyTorch's MKL path forward and backward with AVX-512 only.
_ONEDNN_ROWS = torch.backends.cpu.get_cpu_capability() == "AVX512"


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_chans, out_chans, 1)`` on ``(B, C, H, W)`` maps.

    On a channels-last map the 1x1 convolution is one ``(B*H*W, C) x (C, out)`` matrix product.
    PyTorch hands single-threaded 1x1 convolutions with a batch below 16 (the training batch of
    a process under torchrun, which sets one thread per process) to its own MKL-based kernel,
    which runs at half oneDNN's speed on CPUs where MKL does not use AVX-512 (AMD). Where PyTorch
    runs AVX-512 code, this module convolves the same memory viewed as a ``(B*H, C, W, 1)``
    channels-last batch, which oneDNN takes, forward and backward, whenever ``B*H >= 16`` (every
    MG-SSAF stage at 224 with a batch of 3 or more). On AVX2 machines oneDNN's 1x1 backward is
    slower than MKL's, and the module is plain ``nn.Conv2d``. The numbers are those of the same
    matrix product; parameter names and shapes are ``nn.Conv2d``'s.
    """

    def __init__(self, in_chans: int, out_chans: int, bias: bool = True) -> None:
        super().__init__(in_chans, out_chans, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not _ONEDNN_ROWS
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        b, c, h, w = x.shape
        # (B, H, W, C) memory as a (B*H, C, W, 1) channels-last batch: a view
        rows = x.permute(0, 2, 3, 1).reshape(b * h, w, 1, c).permute(0, 3, 1, 2)
        out = F.conv2d(rows, self.weight, self.bias)  # (B*H, out, W, 1), channels-last
        return out.permute(0, 2, 3, 1).reshape(b, h, w, -1).permute(0, 3, 1, 2)
