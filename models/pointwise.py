"""1x1 convolution on channels-last maps, tuned for x86 CPUs.

A 1x1 convolution of a channels-last ``(B, C, H, W)`` map is a matrix product: the map's memory
is the ``(B*H*W, C)`` matrix of its pixels. Two things make ``nn.Conv2d`` slower than that
product needs:

* Where PyTorch runs AVX2 code (oneDNN and MKL then both run AVX2), oneDNN's weight gradient
  runs at 50-80% of its forward's speed: on a Zen 3 EPYC, at MG-SSAF-T's 1x1 shapes (batch 8, 2
  threads), 64-135 GFLOP/s against the forward's 116-175, while MKL computes the same products
  at 96-169. There, in training, ``PointwiseConv2d`` computes ``F.linear`` on the
  ``(B, H, W, C)`` view of the map (forward ``Y = X W^T + b``; backward ``dX = dY W`` and
  ``dW = dY^T X``, all MKL's), and returns the ``(B, H, W, out)`` result viewed as a
  channels-last ``(B, out, H, W)`` map. These are plain ATen ops: ``torch.compile`` fuses
  around them (Inductor calls MKL for the products), and they take double backward and
  forward-mode AD. Inference stays oneDNN's convolution: at batch 16 MKL's forward measured
  0.94x oneDNN's over MG-SSAF-B's shapes (parity over T's).
* PyTorch hands single-threaded 1x1 convolutions with a batch below 16 (the training batch of a
  process under torchrun, which sets one thread per process) to its own MKL-based kernel, which
  runs 15-60% slower than oneDNN's forward and up to 45% slower backward, on AVX2 and AVX-512
  alike. Where the convolution is oneDNN's (AVX-512 CPUs, where oneDNN runs AVX-512 and MKL
  may not: on AMD CPUs MKL runs AVX2; and AVX2 CPUs outside the matrix product's cases),
  ``PointwiseConv2d`` convolves a channels-last map with a batch below 16 as the same memory
  viewed as a channels-last batch of ``B*k`` images of ``H/k`` rows (``k`` the smallest divisor
  of ``H`` with ``B*k >= 16``), which oneDNN takes, forward and backward. (Images of one
  column, ``(B*H, C, W, 1)``, would do as well with AVX-512, but oneDNN's AVX2 backward is
  ~1.4x slower on them.) Only there: with more threads, and for bfloat16 convolutions, PyTorch
  calls oneDNN itself, and the view cost time (training steps at MG-SSAF-T's shapes, batch 8,
  a Zen 4 EPYC: bf16 1x1 convolutions, forward and backward, 311 ms with plain convolutions
  against 349 ms through the view on 2 threads, 533 against 555 ms on one; float32 on 2
  threads 565 against 580 ms).

The numbers are those of the same products (to float round-off); parameter names and shapes are
``nn.Conv2d``'s, and the weight gradient of a contiguous or channels-last weight has the
weight's strides (what DDP's buckets expect). The matrix product is for weights that require
grad, with grad enabled, on channels-last float32/float64 maps with autocast off. Under
bfloat16 autocast on CPUs without bfloat16 kernels, ``models.conv.Conv2d`` convolves float32
copies with autocast off (``convolve_through_float32``), so those take it too, but for graphs
being compiled: AOTAutograd traces their backward under the forward's autocast, which would
make the products' backward bfloat16 products (generic code there), while a convolution's
backward stays float32. For the same reason a backward run inside an autocast region (rather
than after it, as ``main.py`` runs it) computes the products' gradients in bfloat16, as it
does for any ``nn.Linear``. Outside the matrix product's cases, exported and traced graphs,
batches of 16 or more, convolutions that are not float32 or run on more than one thread, maps
that are not channels-last, CPUs other than x86 ones and other devices convolve with plain
``F.conv2d`` (``_plain_conv``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .conv import Conv2d, recording

__all__ = ["PointwiseConv2d"]

# PyTorch gives single-threaded 1x1 convolutions of smaller batches to its MKL-based kernel.
_ONEDNN_MIN_BATCH = 16
# oneDNN beats that kernel, forward and backward, where PyTorch runs AVX2 or AVX-512 code.
_ONEDNN_FASTER = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# MKL's matrix products match oneDNN's AVX2 forward and beat its weight gradient (Zen 3 EPYC).
_MATRIX_PRODUCT = (torch.backends.cpu.get_cpu_capability() == "AVX2"
                   and torch.backends.mkl.is_available())


def _pieces(batch: int, height: int) -> int:
    """The smallest ``k`` dividing ``height`` with ``batch * k >= 16`` (``height`` if none)."""
    return next((k for k in range(1, height + 1)
                 if height % k == 0 and batch * k >= _ONEDNN_MIN_BATCH), height)


@torch.compiler.assume_constant_result
def _one_thread() -> bool:
    """Whether PyTorch runs on one thread; a constant to ``torch.compile`` (a compiled graph keeps
    the convolution it chose at compile time: the same numbers either way)."""
    return torch.get_num_threads() == 1


def _native_kernel_case(x: torch.Tensor) -> bool:
    """Whether PyTorch would give a 1x1 convolution of ``x`` with a batch below 16 to its own
    kernel: a float32 convolution (not under CPU autocast, whose bfloat16 convolutions are
    always oneDNN's) on one thread."""
    return x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and _one_thread()


def _plain_conv(x: torch.Tensor) -> bool:
    """Whether ``x`` goes to ``F.conv2d`` as it is: off x86 CPUs, at batches of 16 or more,
    where PyTorch would not use its own kernel (more than one thread, bfloat16), on maps that
    are not channels-last, and wherever a graph is recorded."""
    return (x.device.type != "cpu" or not _ONEDNN_FASTER or recording()
            or x.shape[0] >= _ONEDNN_MIN_BATCH or not _native_kernel_case(x)
            or not x.is_contiguous(memory_format=torch.channels_last))


def _onednn_conv(x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The 1x1 convolution of ``x`` ``(B, C, H, W)`` by ``weight`` ``(out, C, 1, 1)``, below a
    batch of 16 on channels-last maps as a batch of ``B*k`` images oneDNN takes."""
    if _plain_conv(x):
        return F.conv2d(x, weight, bias)
    b, c, h, w = x.shape
    k = _pieces(b, h)
    # (B, H, W, C) memory as a (B*k, C, H/k, W) channels-last batch: a view
    pieces = x.permute(0, 2, 3, 1).reshape(b * k, h // k, w, c).permute(0, 3, 1, 2)
    out = F.conv2d(pieces, weight, bias)  # (B*k, out, H/k, W), channels-last
    return out.permute(0, 2, 3, 1).reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _as_matrix_product(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the convolution of ``x`` by ``weight`` is ``_matrix_product``: in training (a
    weight that requires grad) where PyTorch runs AVX2 code and has MKL, on channels-last
    float32/float64 CPU maps, autocast off, outside recorded graphs (which hold the
    convolution)."""
    return (_MATRIX_PRODUCT and torch.is_grad_enabled() and weight.requires_grad
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu") and not recording()
            and x.is_contiguous(memory_format=torch.channels_last))


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The ``(out, C)`` matrix of an ``(out, C, 1, 1)`` weight, as a view whose gradient comes back
    in the weight's strides: those of a contiguous weight ``(C, 1, 1, 1)``, else channels-last
    ``(C, 1, C, C)``, the layout ``main.py`` gives the model."""
    if weight.stride()[2:] == (1, 1):
        return weight.flatten(1)
    return weight.permute(0, 2, 3, 1).flatten(1)  # (out, 1, 1, C) -> (out, C)


def _matrix_product(x: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The 1x1 convolution of a channels-last ``x`` ``(B, C, H, W)`` as ``F.linear`` on its
    ``(B, H, W, C)`` view; the result is a channels-last ``(B, out, H, W)`` view."""
    out = F.linear(x.permute(0, 2, 3, 1), _weight_matrix(weight), bias)  # (B, H, W, out)
    return out.permute(0, 3, 1, 2)


class PointwiseConv2d(Conv2d):
    """``nn.Conv2d(in_chans, out_chans, 1)`` on ``(B, C, H, W)`` maps: in training where PyTorch
    runs AVX2 code, MKL's matrix product on channels-last maps; otherwise on x86 CPUs oneDNN's
    convolution, below a batch of 16 in float32 on one thread through the batch view (see the
    module docstring)."""

    def __init__(self, in_chans: int, out_chans: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_chans, out_chans, 1, bias=bias, device=device, dtype=dtype)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        if _as_matrix_product(x, weight):
            return _matrix_product(x, weight, bias)
        return _onednn_conv(x, weight, bias)

    def convolve_through_float32(self, x: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution of the bfloat16-rounded float32 copies ``(B, C, H, W)``, autocast off:
        ``convolve``, but oneDNN's convolution in graphs being compiled. AOTAutograd traces
        their backward under the forward's autocast, which would make the matrix product's
        backward bfloat16 products (generic code on CPUs without bfloat16 kernels); autocast
        leaves the convolution's backward alone."""
        if torch.compiler.is_compiling():
            return _onednn_conv(x, weight, bias)
        return self.convolve(x, weight, bias)
