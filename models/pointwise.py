"""1x1 convolution on channels-last maps that always runs as oneDNN's GEMM on x86 CPUs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import Conv2d

__all__ = ["PointwiseConv2d"]

# PyTorch gives single-threaded 1x1 convolutions of smaller batches to its MKL-based kernel.
_ONEDNN_MIN_BATCH = 16
# oneDNN beats that kernel, forward and backward, where PyTorch runs AVX2 or AVX-512 code.
_ONEDNN_FASTER = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _pieces(batch: int, height: int) -> int:
    """The smallest ``k`` dividing ``height`` with ``batch * k >= 16`` (``height`` if none)."""
    return next((k for k in range(1, height + 1)
                 if height % k == 0 and batch * k >= _ONEDNN_MIN_BATCH), height)


def _plain_conv(x: torch.Tensor) -> bool:
    """Whether ``x`` goes to ``nn.Conv2d`` as it is: off x86 CPUs, at batches of 16 or more, on
    maps that are not channels-last, and wherever a graph is recorded (``torch.export``,
    ``torch.jit.trace``), which must not depend on the batch the example happens to have."""
    return (x.device.type != "cpu" or not _ONEDNN_FASTER or torch.compiler.is_exporting()
            or torch.jit.is_tracing() or x.shape[0] >= _ONEDNN_MIN_BATCH
            or not x.is_contiguous(memory_format=torch.channels_last))


class PointwiseConv2d(Conv2d):
    """``nn.Conv2d(in_chans, out_chans, 1)`` on ``(B, C, H, W)`` maps.

    On a channels-last map the 1x1 convolution is one ``(B*H*W, C) x (C, out)`` matrix product.
    PyTorch hands single-threaded 1x1 convolutions with a batch below 16 (the training batch of
    a process under torchrun, which sets one thread per process) to its own MKL-based kernel,
    which runs 15-60% slower than oneDNN's forward and up to 45% slower backward, on AVX2 and
    AVX-512 alike. Below a batch of 16 this module convolves the same memory viewed as a
    channels-last batch of ``B*k`` images of ``H/k`` rows (``k`` the smallest divisor of ``H``
    with ``B*k >= 16``), which oneDNN takes, forward and backward. (Images of one column,
    ``(B*H, C, W, 1)``, would do as well with AVX-512, but oneDNN's AVX2 backward is ~1.4x
    slower on them.) The numbers are those of the same matrix product; parameter names and shapes
    are ``nn.Conv2d``'s. Exported and traced graphs get the plain convolution (``_plain_conv``).
    """

    def __init__(self, in_chans: int, out_chans: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_chans, out_chans, 1, bias=bias, device=device, dtype=dtype)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        if _plain_conv(x):
            return self._conv_forward(x, weight, bias)
        b, c, h, w = x.shape
        k = _pieces(b, h)
        # (B, H, W, C) memory as a (B*k, C, H/k, W) channels-last batch: a view
        pieces = x.permute(0, 2, 3, 1).reshape(b * k, h // k, w, c).permute(0, 3, 1, 2)
        out = F.conv2d(pieces, weight, bias)  # (B*k, out, H/k, W), channels-last
        return out.permute(0, 2, 3, 1).reshape(b, h, w, -1).permute(0, 3, 1, 2)
