"""Depthwise convolution whose CPU backward is as fast as its forward allows.

oneDNN runs a depthwise convolution's forward with a dedicated kernel, but computes its weight
gradient with the generic grouped-convolution kernel: at MG-SSAF-T's 7x7, 192-channel, 56x56 maps
the backward takes about 12x the forward. ``DepthwiseConv2d`` keeps the forward (``F.conv2d``)
and, on CPU in float32/float64 with stride 1, computes the gradients as:

* input gradient: the same depthwise convolution of the output gradient with the kernel flipped
  in both spatial dimensions (oneDNN's fast forward kernel);
* weight and bias gradients: ``dW[c, i, j] = sum_{b,h,w} dY[b, c, h, w] * X[b, c, h+i-p, w+j-p]``
  (zero outside the map) and ``db[c] = sum dY[b, c, h, w]``, one pass of a small C kernel (below)
  over the channels-last maps, row by row, with the k partial sums of a kernel row and a block of
  channels in registers, on PyTorch's own OpenMP threads. It is compiled on first use by
  ``models/ckernel.py`` for the instruction set PyTorch itself dispatches to.

Both are PyTorch custom ops (``torch.library``): ``mgssaf::depthwise_conv2d`` (the forward,
``F.conv2d``, whose autograd formula is the above) and ``mgssaf::depthwise_weight_grad`` (the C
kernel), each with a fake implementation and a FLOP formula, so ``torch.compile`` keeps the fast
backward. It applies to the 5x5 and 7x7 kernels (at 3x3 oneDNN's own backward is within 2-4x of
the forward), with grad enabled, in float32, float64 and bfloat16: under CPU autocast to bfloat16
the convolution runs on bfloat16 copies of the input and parameters, as autocast runs
``nn.Conv2d``, and the kernel loads the bfloat16 maps and sums in float32 (on CPUs without
bfloat16 kernels, through float32 copies: ``models.conv.Conv2d``). Everywhere else (CUDA,
where cuDNN has dedicated depthwise kernels; autocast to other dtypes; stride 2; channel counts
that are no multiple of the kernel's channel block; no C compiler; no grad; graphs recorded to
run elsewhere, by ``torch.export`` or ``torch.jit.trace``, which keep ATen's convolution) the
module is ``models.conv.Conv2d``: ``nn.Conv2d``, but for bfloat16 autocast on CPUs without
bfloat16 kernels, and for strided ones in training under CPU autocast to bfloat16 on any CPU,
which run through float32 as there: oneDNN computes a strided depthwise convolution's bfloat16
backward with its generic grouped kernel, 4-8x slower than the float32 path.
Parameter names and shapes are ``nn.Conv2d``'s, so checkpoints load as before, and the weight
gradient has the weight's own strides (what DDP's buckets expect).
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from . import ckernel
from .conv import Conv2d, autocast_off, cpu_bfloat16_autocast, recording, wants_grad

__all__ = ["DepthwiseConv2d", "depthwise_conv2d", "depthwise_weight_grad"]

# Channels per register block of the weight-gradient kernel, by PyTorch's CPU capability.
_CHANNEL_BLOCK = {"AVX512": 16, "AVX2": 8}

_KERNEL_SOURCE = r"""
/* Weight and bias gradients of a stride-1, 'same'-padded depthwise convolution on channels-last
 * maps (P = K/2, x zero outside the map):
 *   out[i][j][c] = sum_{b,h,w} g[b][h][w][c] * x[b][h+i-P][w+j-P][c],  out[K][0][c] = sum g
 * g, x: (B, H, W, C); out: K*K*C + C values, zeroed by the caller.
 * Each thread owns a contiguous range of CB-channel blocks and walks the maps row by row; for
 * one output row h and kernel row i it sweeps every block of its range along the row, with the
 * K sums of (i, block) and the K values of g that meet the current column of x in registers,
 * so that each value is loaded (and, from bfloat16, widened) once per sweep. Consecutive blocks
 * share the cache lines the sweep before brought in, and rows h..h+K-1 of x stay in cache while
 * h advances, so each map is read from memory about once. Rows outside the map are skipped;
 * output columns outside it enter the register window as zeros (so an infinite x makes NaN
 * there, where the taps it meets inside the map are infinite already).
 * The threads are those of PyTorch's OpenMP pool when the caller passes libgomp's
 * GOMP_parallel, omp_get_thread_num and omp_get_num_threads (threads of another pool would
 * compete with PyTorch's spinning workers), else the work runs on the calling thread. The
 * blocks are split over the team OpenMP actually started, which may be smaller than asked. */
#ifdef BF16_INPUT /* x and g in bfloat16 (the upper half of a float32), sums in float32 */
typedef unsigned short IN;
#else
typedef REAL IN;
#endif

typedef struct {
    const IN *x, *g;
    REAL *out;
    long B, H, W, C, K;
    int (*thread_num)(void), (*num_threads)(void);
} Job;

typedef REAL vec __attribute__((vector_size(CB * sizeof(REAL)), aligned(sizeof(REAL)),
                                 may_alias));
#ifdef BF16_INPUT
typedef unsigned short hvec __attribute__((vector_size(CB * 2), aligned(2), may_alias));
typedef unsigned int uvec __attribute__((vector_size(CB * 4)));
/* CB bfloat16 values widened to float32: each one's 16 bits become a float's upper half */
static inline __attribute__((always_inline)) vec LOADV(const IN *p) {
    return (vec)(__builtin_convertvector(*(const hvec *)p, uvec) << 16);
}
#else
#define LOADV(p) (*(const vec *)(p))
#endif

/* One step of a row sweep, at input column u: the window gw[j] = g[u + P - j] moves one column
 * on (g[u + P] comes in as gw[0], or zero past the map's right edge), and x[u] is loaded once
 * for all K products. Each sum s[j] still takes its terms in increasing output column. */
#define ROLL_STEP(K, incoming)                                                          \
    {                                                                                   \
        _Pragma("GCC unroll 8")                                                         \
        for (long j = K - 1; j > 0; j--) gw[j] = gw[j - 1];                             \
        gw[0] = incoming;                                                               \
        const vec xv = LOADV(xrow + u * C + c0);                                        \
        _Pragma("GCC unroll 8")                                                         \
        for (long j = 0; j < K; j++) s[j] += gw[j] * xv;                                \
    }

#define SWEEP(K)                                                                        \
    static void sweep##K(const Job *t, long first, long last) {                         \
        const long C = t->C, H = t->H, W = t->W, P = K / 2;                             \
        const vec zero = {0};                                                           \
        for (long b = 0; b < t->B; b++)                                                 \
            for (long h = 0; h < H; h++)                                                \
                for (long i = 0; i < K; i++) {                                          \
                    const long hi = h + i - P;                                          \
                    if (hi < 0 || hi >= H) continue;                                    \
                    const int centre = i == P;                                          \
                    const IN *grow = t->g + ((b * H + h) * W) * C;                      \
                    const IN *xrow = t->x + ((b * H + hi) * W) * C;                     \
                    for (long c0 = first * CB; c0 < last * CB; c0 += CB) {              \
                        REAL *o = t->out + i * K * C + c0;                              \
                        vec s[K], gw[K], bias = {0};                                    \
                        _Pragma("GCC unroll 8")                                         \
                        for (long j = K - 1; j >= 0; j--) {                             \
                            s[j] = *(vec *)(o + j * C);                                 \
                            /* the window before column 0: gw[j] = g[P - 1 - j] */      \
                            const long w = P - 1 - j;                                   \
                            gw[j] = w >= 0 && w < W ? LOADV(grow + w * C + c0) : zero;  \
                            bias += gw[j];                                              \
                        }                                                               \
                        long u = 0;                                                     \
                        for (; u + P < W; u++) {                                        \
                            const vec gv = LOADV(grow + (u + P) * C + c0);              \
                            bias += gv;                                                 \
                            ROLL_STEP(K, gv)                                            \
                        }                                                               \
                        for (; u < W; u++) ROLL_STEP(K, zero)                           \
                        _Pragma("GCC unroll 8")                                         \
                        for (long j = 0; j < K; j++) *(vec *)(o + j * C) = s[j];        \
                        if (centre) *(vec *)(t->out + K * K * C + c0) += bias;          \
                    }                                                                   \
                }                                                                       \
    }
SWEEP(3)
SWEEP(5)
SWEEP(7)

static void run(void *arg) {
    const Job *t = (const Job *)arg;
    const long n = t->thread_num ? t->thread_num() : 0, blocks = t->C / CB;
    const long threads = t->num_threads ? t->num_threads() : 1;
    const long first = n * blocks / threads, last = (n + 1) * blocks / threads;
    if (t->K == 3) sweep3(t, first, last);
    else if (t->K == 5) sweep5(t, first, last);
    else sweep7(t, first, last);
}

/* Returns 0, or -1 for a kernel size it does not handle. C must be a multiple of CB. */
int depthwise_weight_grad(const IN *x, const IN *g, REAL *out, long B, long H, long W,
                          long C, long K, long threads,
                          void (*gomp_parallel)(void (*)(void *), void *, unsigned, unsigned),
                          int (*thread_num)(void), int (*num_threads)(void)) {
    if (K != 3 && K != 5 && K != 7) return -1;
    const long blocks = C / CB;
    if (!gomp_parallel || !thread_num || !num_threads || threads < 1) threads = 1;
    if (threads > blocks) threads = blocks;
    Job job = {x, g, out, B, H, W, C, K, threads > 1 ? thread_num : 0,
               threads > 1 ? num_threads : 0};
    if (threads > 1) gomp_parallel(run, &job, (unsigned)threads, 0);
    else run(&job);
    return 0;
}
"""

# Kernel sizes that take the fast backward: at 3x3, oneDNN's own backward is already within 2-4x
# of the forward, and the C kernel measured no faster there (0.8-1.3x, by shape and ISA).
_FAST_KERNELS = (5, 7)


def channel_block() -> int:
    """Channels per block of the compiled kernel (the channel count must be a multiple)."""
    return _CHANNEL_BLOCK.get(ckernel.capability(), 4)


def _setup(library: ctypes.CDLL) -> None:
    library.depthwise_weight_grad.restype = ctypes.c_int
    library.depthwise_weight_grad.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_long] * 6
                                              + [ctypes.c_void_p] * 3)


def _library(dtype: torch.dtype) -> Optional[ctypes.CDLL]:
    """The kernel for maps in ``dtype`` (compiled on first use; bfloat16 maps: float32 sums), or
    None without a C compiler."""
    defines = {"REAL": "double" if dtype == torch.float64 else "float", "CB": channel_block()}
    if dtype == torch.bfloat16:
        defines["BF16_INPUT"] = 1
    return ckernel.load("depthwise", _KERNEL_SOURCE, defines, _setup)


@torch.compiler.assume_constant_result
def _kernel_ready(dtype: torch.dtype, channels: int) -> bool:
    """Whether the weight-gradient kernel for ``dtype`` takes ``channels`` channels and is
    compiled (compiling it on first use)."""
    return channels % channel_block() == 0 and _library(dtype) is not None


_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the convolution runs in: under CPU autocast to bfloat16 (float32 or bfloat16
    input), bfloat16, as autocast runs ``nn.Conv2d``; outside autocast, the input's if the
    weight has it; None for every other case (other autocast dtypes)."""
    if torch.is_autocast_enabled("cpu"):
        autocast = torch.get_autocast_dtype("cpu")
        return (autocast if autocast == torch.bfloat16
                and x.dtype in (torch.float32, torch.bfloat16) else None)
    return x.dtype if weight.dtype == x.dtype and x.dtype in _DTYPES else None


def fast_backward_available(x: torch.Tensor, weight: torch.Tensor, stride: int) -> bool:
    """Whether ``DepthwiseConv2d`` takes the fast CPU backward for this input and weight."""
    k, dtype = weight.shape[-1], _compute_dtype(x, weight)
    return (x.device.type == "cpu" and weight.device.type == "cpu" and dtype is not None
            and stride == 1 and weight.shape[-2] == k and k in _FAST_KERNELS
            and _kernel_ready(dtype, x.shape[1]))


@torch.library.custom_op("mgssaf::depthwise_weight_grad", mutates_args=())
def depthwise_weight_grad(x: torch.Tensor, grad_out: torch.Tensor,
                          kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients, ``(C, 1, k, k)`` and ``(C,)``, of a stride-1, 'same'-padded
    depthwise convolution of ``x`` ``(B, C, H, W)`` whose output gradient is ``grad_out``
    ``(B, C, H, W)`` (CPU; float32, float64, or bfloat16 summed in float32), in ``x``'s dtype."""
    b, c, h, w = x.shape
    # (B, H, W, C): views, copied only if not channels-last already
    xt = x.permute(0, 2, 3, 1).contiguous()
    g = grad_out.permute(0, 2, 3, 1).contiguous()
    # (k*k weights + bias, C), in the kernel's sum type
    out = torch.zeros(kernel_size * kernel_size + 1, c,
                      dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    status = _library(x.dtype).depthwise_weight_grad(
        xt.data_ptr(), g.data_ptr(), out.data_ptr(), b, h, w, c, kernel_size,
        torch.get_num_threads(), *ckernel.openmp_pool())
    if status:
        raise RuntimeError(f"depthwise_weight_grad: kernel size {kernel_size} not supported")
    grad_w = out[:-1].t().reshape(c, 1, kernel_size, kernel_size).contiguous()
    return grad_w.to(x.dtype), out[-1].to(x.dtype, copy=True)


@depthwise_weight_grad.register_fake
def _(x: torch.Tensor, grad_out: torch.Tensor,
      kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    channels = x.shape[1]
    return x.new_empty(channels, 1, kernel_size, kernel_size), x.new_empty(channels)


@torch.library.custom_op("mgssaf::depthwise_conv2d", mutates_args=(), device_types="cpu")
def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Stride-1, 'same'-padded depthwise convolution of ``x`` ``(B, C, H, W)`` by ``weight``
    ``(C, 1, k, k)``: ``F.conv2d``'s forward, with the fast CPU backward as its autograd formula
    (see the module doc)."""
    return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, x.shape[1])


@depthwise_conv2d.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, x.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _gradients(ctx, grad_out: torch.Tensor):
    """The input gradient as the depthwise convolution with the flipped kernel; the weight and
    bias gradients from ``depthwise_weight_grad``, in the weight's own strides (as autograd and
    DDP's gradient buckets expect)."""
    x, weight = ctx.saved_tensors
    k, channels = weight.shape[-1], x.shape[1]
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:  # in the saved dtypes, also when traced under autocast
        with autocast_off(grad_out.device.type):
            grad_x = F.conv2d(grad_out, weight.flip(-2, -1), None, 1, k // 2, 1, channels)
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        grad_w, grad_b = depthwise_weight_grad(x, grad_out, k)
        grad_w = torch.empty_like(weight).copy_(grad_w)
    return grad_x, grad_w, grad_b if ctx.has_bias else None


depthwise_conv2d.register_autograd(_gradients, setup_context=_setup_context)


@register_flop_formula(torch.ops.mgssaf.depthwise_conv2d)
def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the forward: 2 per multiply-add, k*k per output value."""
    b, c, h, w = x_shape
    return 2 * b * c * h * w * w_shape[-1] * w_shape[-2]


@register_flop_formula(torch.ops.mgssaf.depthwise_weight_grad)
def _(x_shape, grad_out_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the weight gradient (the input gradient is an ATen convolution, counted as one)."""
    b, c, h, w = x_shape
    return 2 * b * c * h * w * kernel_size * kernel_size


class DepthwiseConv2d(Conv2d):
    """``nn.Conv2d(dim, dim, k, stride, k // 2, groups=dim)`` on ``(B, C, H, W)`` maps (any memory
    format), with the fast CPU backward where it applies (see the module docstring)."""

    def __init__(self, dim: int, kernel_size: int, stride: int = 1,
                 device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim,
                         device=device, dtype=dtype)

    def through_float32(self, x: torch.Tensor) -> bool:
        # With grad, strided ones too: oneDNN's bfloat16 backward of a strided depthwise
        # convolution is its generic grouped kernel, 4-8x the float32 forward and backward
        # (MG-SSAF-T's 3x3 stride-2 downsampling shapes, batch 8, a Zen 4 EPYC)
        return super().through_float32(x) or (
            self.stride != (1, 1) and wants_grad(x, *self.parameters())
            and cpu_bfloat16_autocast(x))

    def convolve(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        # a recorded graph (torch.export, torch.jit.trace) is the same with and without grad
        if (torch.is_grad_enabled() and not recording()
                and fast_backward_available(x, weight, self.stride[0])):
            # under autocast, on bfloat16 copies, as autocast runs nn.Conv2d (no-ops otherwise)
            dtype = _compute_dtype(x, weight)
            bias = bias.to(dtype) if bias is not None else None
            return depthwise_conv2d(x.to(dtype), weight.to(dtype), bias)
        return self._conv_forward(x, weight, bias)
