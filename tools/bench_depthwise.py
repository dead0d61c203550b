"""Depthwise convolution forward and backward at MG-SSAF's shapes: ``nn.Conv2d`` (PyTorch's own
backward) against ``models.depthwise.DepthwiseConv2d`` (the fast CPU backward), timed alternately
in one process so that both see the same machine load.

    python tools/bench_depthwise.py                      # MG-SSAF-T's shapes, batch 8, 2 threads
    python tools/bench_depthwise.py --threads 1 --batch-size 8 --repeats 20
    python tools/bench_depthwise.py --dtype bfloat16     # under CPU autocast to bfloat16

Each row: the ConvMlp depthwise convolutions of one stage (3x3 on C channels, 7x7 on 2C), on
channels-last float32 maps (with ``--dtype bfloat16`` the forward runs under CPU autocast, as in
AMP training: bfloat16 copies of the map and parameters). Times are medians in ms; the backward
computes the input, weight and bias gradients (``torch.autograd.grad`` of a retained graph).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.conv import bfloat16_through_float32  # noqa: E402
from models.depthwise import DepthwiseConv2d, fast_backward_available  # noqa: E402
from tools.microbench import add_arguments, alternate, set_threads  # noqa: E402


def bench_shape(channels: int, size: int, kernel: int, batch: int, repeats: int,
                dtype: torch.dtype = torch.float32) -> dict:
    """Median forward and backward ms of both implementations, alternating call by call; the
    forward under CPU autocast to ``dtype`` unless it is float32. ``fwd`` is nn.Conv2d's forward
    and ``fast_fwd`` DepthwiseConv2d's: the same F.conv2d call (the faster of the two timings),
    but under bf16 autocast on CPUs without bf16 kernels, where DepthwiseConv2d convolves
    float32 copies."""
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    native = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
    fast = DepthwiseConv2d(channels, kernel)
    fast.load_state_dict(native.state_dict())
    calls = {}
    for name, conv in (("native", native), ("fast", fast)):
        with autocast:
            y = conv(x)
        grad = torch.randn_like(y)
        inputs = (x, conv.weight, conv.bias)

        def forward(c: nn.Module = conv) -> torch.Tensor:
            with autocast:
                return c(x)

        calls[name, "fwd"] = forward
        calls[name, "bwd"] = lambda y=y, g=grad, i=inputs: torch.autograd.grad(y, i, g,
                                                                              retain_graph=True)
    times = alternate(calls, repeats)
    with autocast:
        fast_path = fast_backward_available(x, fast.weight, 1)
        same_forward = not bfloat16_through_float32(x)
    fwd = times["native", "fwd"]
    fast_fwd = times["fast", "fwd"]
    if same_forward:
        fwd = fast_fwd = min(fwd, fast_fwd)
    return {"shape": f"{channels}x{size}x{size} {kernel}x{kernel}", "fast": fast_path,
            "fwd": fwd, "fast_fwd": fast_fwd, "native_bwd": times["native", "bwd"],
            "fast_bwd": times["fast", "bwd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed-dim", type=int, default=96, help="stage-0 channels (T, S: 96)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: the forward under CPU autocast to bfloat16")
    add_arguments(parser)
    args = parser.parse_args()
    set_threads(args)
    dtype = getattr(torch, args.dtype)
    precision = "float32" if dtype == torch.float32 else "bfloat16 autocast"
    print(f"# {torch.get_num_threads()} threads, batch {args.batch_size}, {precision}, "
          f"channels-last, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          "median ms", file=sys.stderr)
    print("| shape (C x H x W, kernel) | fwd | bwd nn.Conv2d | bwd / fwd | bwd DepthwiseConv2d "
          "| bwd / fwd | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for stage in range(4):
        channels, size = args.embed_dim * 2 ** stage, args.img_size // 2 ** (stage + 2)
        for c, kernel in ((channels, 3), (2 * channels, 7)):
            r = bench_shape(c, size, kernel, args.batch_size, args.repeats, dtype)
            print(f"| {r['shape']}{'' if r['fast'] else ' (no fast path)'} | {r['fwd']:.2f} "
                  f"| {r['native_bwd']:.2f} | {r['native_bwd'] / r['fwd']:.1f} "
                  f"| {r['fast_bwd']:.2f} | {r['fast_bwd'] / r['fast_fwd']:.1f} "
                  f"| {r['native_bwd'] / r['fast_bwd']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
