"""``Conv2d``: ``nn.Conv2d`` whose bfloat16 autocast stays fast on CPUs without bfloat16 kernels.

Under CPU autocast to bfloat16, ``nn.Conv2d`` convolves bfloat16 copies of its input, weight and
bias. oneDNN's bfloat16 kernels (AVX-512 with BW/VL/DQ, AVX512-BF16 or AMX) load bfloat16, sum
in float32 and store bfloat16. On CPUs without them (x86 CPUs without AVX-512: Zen 1-3, Intel
client CPUs, Intel servers before Skylake-SP; ARM CPUs without bf16) PyTorch falls back to its
generic convolution, which runs grouped convolutions one channel at a time: on a Zen 3 EPYC the
7x7 depthwise convolution of MG-SSAF-T's first stage takes 80x its float32 time and a 1x1
convolution 12x.

There ``Conv2d`` computes the same numbers through float32: it rounds the input, weight and bias
to bfloat16 (what autocast's copies hold), convolves float32 copies of them with autocast off,
and returns the output rounded to bfloat16, as oneDNN's bfloat16 kernels do; gradients flow back
through the copies in the input's and the parameters' own dtypes. The float32 copies are what
autograd saves for the backward: activation memory is float32 training's, not bf16's. (Compiled
by Inductor, which by default does not emulate precision casts, the rounded copies may keep their
float32 values: the outputs then differ by bfloat16 round-off.) Everywhere else (no autocast,
other autocast dtypes, CUDA, CPUs with bfloat16 kernels, graphs recorded by ``torch.export`` or
``torch.jit.trace``) it is ``nn.Conv2d``. Subclasses change how the convolution is computed by
overriding ``convolve`` (and ``convolve_through_float32`` where the float32 path must differ),
and add cases for the float32 path by overriding ``through_float32``
(``DepthwiseConv2d``: strided ones in training); parameter names and shapes are ``nn.Conv2d``'s.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

__all__ = ["Conv2d", "autocast_off", "bfloat16_through_float32", "cpu_bfloat16_autocast",
           "cpu_bfloat16_native", "recording", "wants_grad"]


def cpu_bfloat16_native() -> bool:
    """Whether oneDNN runs bfloat16 convolutions and matrix products on this CPU (PyTorch's own
    check: AVX-512 with BW, VL and DQ, or AMX); on other CPUs they run on generic code."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True


_BFLOAT16_NATIVE = cpu_bfloat16_native()  # a constant to torch.compile


def recording() -> bool:
    """Whether a graph is being recorded to run elsewhere (``torch.export``, ``torch.jit.trace``):
    such graphs hold ATen's own convolutions and ops, free of this machine and of the example's
    batch, in place of the CPU fast paths."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will ask for gradients of a computation on ``tensors``: grad mode is on
    and one of them requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cpu_bfloat16_autocast(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` (float32 or bfloat16) runs under CPU autocast to
    bfloat16, outside recorded graphs."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and x.dtype in (torch.float32, torch.bfloat16) and not recording())


def bfloat16_through_float32(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` runs its bfloat16 autocast through float32: on CPU, under
    autocast to bfloat16, on a CPU without bfloat16 kernels, outside recorded graphs."""
    return not _BFLOAT16_NATIVE and cpu_bfloat16_autocast(x)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device_type`` where it is on (a no-op otherwise, so that graphs
    recorded without autocast hold no autocast region, and on devices without autocast, such as
    ``meta``): for computations that must run in their inputs' dtypes, such as a backward formula
    traced under the forward's autocast by ``torch.compile``."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _rounded(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``'s values rounded to bfloat16, as a float32 tensor (None stays None)."""
    return None if t is None else t.to(torch.bfloat16).float()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` on ``(B, C, H, W)`` maps (see the module docstring for bfloat16 autocast on
    CPUs without bfloat16 kernels)."""

    def convolve(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The convolution of ``x`` by ``weight`` and ``bias`` (this module's or their rounded
        float32 copies); subclasses compute it their way."""
        return self._conv_forward(x, weight, bias)

    def convolve_through_float32(self, x: torch.Tensor, weight: torch.Tensor,
                                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The convolution of the bfloat16-rounded float32 copies, autocast off: ``convolve``,
        unless a subclass must compute it otherwise there."""
        return self.convolve(x, weight, bias)

    def through_float32(self, x: torch.Tensor) -> bool:
        """Whether this convolution of ``x`` runs its bfloat16 autocast through float32:
        ``bfloat16_through_float32``, and the cases a subclass adds."""
        return bfloat16_through_float32(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.through_float32(x):
            return self.convolve(x, self.weight, self.bias)
        with autocast_off("cpu"):
            out = self.convolve_through_float32(_rounded(x), _rounded(self.weight),
                                                _rounded(self.bias))
        return out.to(torch.bfloat16)
