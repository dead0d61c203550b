"""1x1 convolution on channels-last maps, tuned for x86 CPUs.

Two things make ``nn.Conv2d``'s 1x1 convolution slower than its arithmetic needs there:

* PyTorch hands single-threaded 1x1 convolutions with a batch below 16 (the training batch of a
  process under torchrun, which sets one thread per process) to its own MKL-based kernel, which
  runs 15-60% slower than oneDNN's forward and up to 45% slower backward, on AVX2 and AVX-512
  alike. Below a batch of 16 ``PointwiseConv2d`` convolves the same memory viewed as a
  channels-last batch of ``B*k`` images of ``H/k`` rows (``k`` the smallest divisor of ``H``
  with ``B*k >= 16``), which oneDNN takes, forward and backward. (Images of one column,
  ``(B*H, C, W, 1)``, would do as well with AVX-512, but oneDNN's AVX2 backward is ~1.4x slower
  on them.)
* oneDNN's AVX2 weight gradient runs at 50-80% of its forward's speed: on a Zen 3 EPYC, at
  MG-SSAF-T's twelve 1x1 shapes (batch 8, 2 threads), 64-135 GFLOP/s against the forward's
  116-175, while MKL's matrix product computes the same gradient at 96-169. Where PyTorch runs
  AVX2 code, eager training therefore goes through ``mgssaf::pointwise_conv2d``, a PyTorch
  custom op (``torch.library``: fake implementation, autograd formula, FLOP formula; graphs
  being compiled get ATen's convolution instead, see ``_weight_grad_by_mkl``) whose forward is
  oneDNN's convolution and whose backward, the custom op
  ``mgssaf::pointwise_conv2d_backward`` (opaque to graph capture, which would otherwise be
  free to give the output gradient layouts of its own; it has no autograd formula: no double
  backward, and neither op has forward-mode AD or a vmap rule), computes

  - input: the 1x1 convolution of the output gradient with the transposed weight (oneDNN's
    forward kernel);
  - weight: ``dW = dY^T X``, one ``(out, B*H*W) x (B*H*W, in)`` matrix product of the
    channels-last maps viewed as matrices (MKL); bias: ``dY`` summed over ``B*H*W``.

  Where PyTorch runs AVX-512 code, oneDNN runs AVX-512 where MKL may not (on AMD CPUs MKL runs
  AVX2), and the weight gradient stays oneDNN's.

The numbers are those of the same matrix products (to float round-off); parameter names and
shapes are ``nn.Conv2d``'s, and the weight gradient has the weight's own strides (what DDP's
buckets expect). The custom ops are for eager training on channels-last float32/float64 maps
with autocast off, where PyTorch runs AVX2 code and has MKL (under bfloat16 autocast on CPUs
without bfloat16 kernels, ``models.conv.Conv2d`` calls ``convolve`` on float32 copies with
autocast off, so those take them too); inference, frozen weights, other maps, dtypes, autocast,
other CPUs and graphs being compiled get ATen's convolution and its backward. Within the op and
outside it, exported and traced graphs, batches of 16 or more, maps that are not channels-last
and other devices convolve with plain ``F.conv2d`` (``_plain_conv``), the others through the
view above.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .conv import Conv2d, recording

__all__ = ["PointwiseConv2d", "pointwise_conv2d"]

# PyTorch gives single-threaded 1x1 convolutions of smaller batches to its MKL-based kernel.
_ONEDNN_MIN_BATCH = 16
# oneDNN beats that kernel, forward and backward, where PyTorch runs AVX2 or AVX-512 code.
_ONEDNN_FASTER = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# MKL's matrix product beats oneDNN's AVX2 weight gradient (measured on a Zen 3 EPYC).
_MKL_WEIGHT_GRAD = (torch.backends.cpu.get_cpu_capability() == "AVX2"
                    and torch.backends.mkl.is_available())


def _pieces(batch: int, height: int) -> int:
    """The smallest ``k`` dividing ``height`` with ``batch * k >= 16`` (``height`` if none)."""
    return next((k for k in range(1, height + 1)
                 if height % k == 0 and batch * k >= _ONEDNN_MIN_BATCH), height)


def _plain_conv(x: torch.Tensor) -> bool:
    """Whether ``x`` goes to ``F.conv2d`` as it is: off x86 CPUs, at batches of 16 or more, on
    maps that are not channels-last, and wherever a graph is recorded."""
    return (x.device.type != "cpu" or not _ONEDNN_FASTER or recording()
            or x.shape[0] >= _ONEDNN_MIN_BATCH
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


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A ``(B, C, H, W)`` map as the ``(B*H*W, C)`` matrix of its pixels (a view of a
    channels-last map)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


@torch.library.custom_op("mgssaf::pointwise_conv2d", mutates_args=(), device_types="cpu")
def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The 1x1 convolution of ``x`` ``(B, C, H, W)`` by ``weight`` ``(out, C, 1, 1)`` (oneDNN's on
    x86), with the weight gradient as a matrix product as its autograd formula (see the module
    doc)."""
    # detached: a view of the convolution's output, handed back as a tensor of its own (autograd
    # forbids in-place changes of a view made inside a custom op)
    return _onednn_conv(x, weight, bias).detach()


@pointwise_conv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.conv2d(x, weight, bias)


def _matrix_gradients(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input gradient ``(B, C, H, W)`` by oneDNN (empty without ``input_grad``), the weight
    gradient as an ``(out, C)`` matrix ``dY^T X`` and the bias gradient ``sum dY``."""
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)  # e.g. expanded by sum()
    rows = _as_rows(grad_out)  # (B*H*W, out)
    grad_x = (_onednn_conv(grad_out, weight.transpose(0, 1), None) if input_grad
              else x.new_empty(0))
    return grad_x, torch.mm(rows.t(), _as_rows(x)), rows.sum(0)


@torch.library.custom_op("mgssaf::pointwise_conv2d_backward", mutates_args=(),
                         device_types="cpu")
def pointwise_conv2d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pointwise_conv2d``'s gradients for the output gradient ``grad_out``: the input's
    (channels-last; empty without ``input_grad``), the weight's as an ``(out, C)`` matrix and the
    bias's. A custom op of its own so that captured graphs hold it as eager runs it (traced
    into a compiled graph, Inductor gave ``grad_out`` a layout of its own choosing and copied it
    with scalar loops)."""
    return tuple(t.detach() for t in _matrix_gradients(grad_out, x, weight, input_grad))


@pointwise_conv2d_backward.register_fake
def _(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
      input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = (torch.empty_like(x, memory_format=torch.channels_last) if input_grad
              else x.new_empty(0))
    return grad_x, x.new_empty(weight.shape[:2]), x.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _gradients(ctx, grad_out: torch.Tensor):
    """``pointwise_conv2d_backward`` (which has no autograd formula itself: no double backward;
    autocast leaves custom ops alone, so it runs in the saved dtypes also when traced under
    autocast). The weight gradient takes the weight's strides: those of the ``(out, C)`` matrix
    for both layouts of an ``(out, C, 1, 1)`` weight (they differ in the size-1 dimensions only),
    else a copy."""
    x, weight = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    grad_x, product, grad_b = pointwise_conv2d_backward(grad_out, x, weight, input_grad)
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = (product.as_strided(weight.shape, weight.stride())
                  if weight.stride()[:2] == product.stride()
                  else torch.empty_like(weight).copy_(product.view(weight.shape)))
    return (grad_x if input_grad else None, grad_w,
            grad_b if ctx.has_bias and ctx.needs_input_grad[2] else None)


pointwise_conv2d.register_autograd(_gradients, setup_context=_setup_context)


@register_flop_formula(torch.ops.mgssaf.pointwise_conv2d)
def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the forward: 2 per multiply-add, ``C`` per output value."""
    b, c, h, w = x_shape
    return 2 * b * c * h * w * w_shape[0]


@register_flop_formula(torch.ops.mgssaf.pointwise_conv2d_backward)
def _(grad_out_shape, x_shape, w_shape, input_grad, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the weight gradient and (with ``input_grad``) of the input gradient: a forward's
    each."""
    b, c, h, w = x_shape
    return (2 if input_grad else 1) * 2 * b * c * h * w * w_shape[0]


def _weight_grad_by_mkl(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the convolution of ``x`` by ``weight`` takes ``pointwise_conv2d``: eager training
    (a weight that requires grad) where PyTorch runs AVX2 code and has MKL, channels-last
    float32/float64 maps, autocast off. Graphs being compiled get ATen's convolution, with whose
    layouts Inductor is free: MG-SSAF-T's compiled training step took 2.13-2.24 s with it
    against 2.33 s with the custom ops (batch 8, Zen 3 EPYC, separate runs of
    ``tools/bench_compile.py``)."""
    return (_MKL_WEIGHT_GRAD and torch.is_grad_enabled() and weight.requires_grad
            and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu") and not recording()
            and x.is_contiguous(memory_format=torch.channels_last))


class PointwiseConv2d(Conv2d):
    """``nn.Conv2d(in_chans, out_chans, 1)`` on ``(B, C, H, W)`` maps, through oneDNN on x86
    CPUs below a batch of 16, with the weight gradient as MKL's matrix product in eager training
    where PyTorch runs AVX2 code (see the module docstring)."""

    def __init__(self, in_chans: int, out_chans: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_chans, out_chans, 1, bias=bias, device=device, dtype=dtype)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        if _weight_grad_by_mkl(x, weight):
            return pointwise_conv2d(x, weight, bias)
        return _onednn_conv(x, weight, bias)
