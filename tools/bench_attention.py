"""SS-MSA + AF (the local branch of every MG-SSAF block) at a config's stage shapes: the fused CPU
kernels (``models/separable.py``) against the same computation in PyTorch ops, timed alternately
in one process so that both see the same machine load.

    python tools/bench_attention.py                       # MG-SSAF-T, batch 8, default threads
    python tools/bench_attention.py --cfg configs/MG-SSAF/MG-SSAF-B.yaml --threads 1

Each row: one block's ``ss_msa`` on the stage's ``(B, H, W, 2*local_heads*d)`` projection,
float32. ``fwd``: inference (no autograd graph); ``fwd+bwd``: forward and the gradients of the
projection and the AF parameters. Times are medians in ms.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from models import separable  # noqa: E402
from models.mg_ssaf import MGSSAFAttention  # noqa: E402
from tools.microbench import add_arguments, alternate, set_threads  # noqa: E402


def bench_stage(attn: MGSSAFAttention, batch: int, size: int, repeats: int) -> dict:
    """Median fwd and fwd+bwd ms of the PyTorch ops and the fused kernels, alternating."""
    qkv = torch.randn(batch, size, size, attn.proj_qkv.out_channels)  # (B, H, W, 2*dim)
    x = qkv[..., :attn.local_channels].requires_grad_(True)
    params = [x, *attn.attn_local_win.parameters()]

    def forward() -> None:
        with torch.no_grad():
            attn.ss_msa(x)

    def train() -> None:
        out = attn.ss_msa(x)
        torch.autograd.grad(out, params, torch.ones_like(out))

    def with_pytorch_ops(fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            with separable.pytorch_ops():
                fn()
        return call

    return alternate({("ops", "fwd"): with_pytorch_ops(forward), ("fused", "fwd"): forward,
                      ("ops", "train"): with_pytorch_ops(train), ("fused", "train"): train},
                     repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default="configs/MG-SSAF/MG-SSAF-T.yaml", help="model config")
    add_arguments(parser)
    args = parser.parse_args()
    set_threads(args)
    config = load_config(args.cfg)
    m = config.MODEL.MGSSAF
    print(f"# {config.MODEL.NAME}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"float32, CPU capability {torch.backends.cpu.get_cpu_capability()}; median ms",
          file=sys.stderr)
    print("| stage (map, local heads) | fwd ops | fwd fused | speed-up "
          "| fwd+bwd ops | fwd+bwd fused | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for stage, heads in enumerate(m.NUM_HEADS):
        dim, size = m.EMBED_DIM * 2 ** stage, config.DATA.IMG_SIZE // 2 ** (stage + 2)
        attn = MGSSAFAttention(dim, heads, m.GLOBAL_RATIO[stage], m.STRIP_WIDTH[stage],
                               m.WINDOW_SIZE)
        x = torch.empty(1, size, size, attn.local_channels)
        if not separable.fused_available(x, m.WINDOW_SIZE, attn.num_local, attn.attn_local_win):
            print(f"| {stage} ({size}x{size}, {attn.num_local}) | no fused path here | | | | | |")
            continue
        t = bench_stage(attn, args.batch_size, size, args.repeats)
        print(f"| {stage} ({size}x{size}, {attn.num_local}) | {t['ops', 'fwd']:.2f} "
              f"| {t['fused', 'fwd']:.2f} | {t['ops', 'fwd'] / t['fused', 'fwd']:.1f}x "
              f"| {t['ops', 'train']:.2f} | {t['fused', 'train']:.2f} "
              f"| {t['ops', 'train'] / t['fused', 'train']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
