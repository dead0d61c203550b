"""Eager against ``torch.compile`` in one process: MG-SSAF's training step (AdamW; the default,
``--phases train``) and inference (``--phases infer``, or ``--phases train infer`` for both), in
float32 or under CPU autocast to bfloat16, the two runners' steps interleaved so that both see
the same machine load.

    python tools/bench_compile.py                        # mg_ssaf_t, training steps, batch 8
    python tools/bench_compile.py --model mg_ssaf_s --steps 7 --threads 2
    python tools/bench_compile.py --dtype float32 bfloat16 --phases train infer
    python tools/bench_compile.py --cfg configs/MG-SSAF/MG-SSAF-B.yaml --opts MODEL.DROP_PATH_RATE 0

The compiled model keeps the fused SS-MSA + AF kernels and the depthwise weight-gradient kernel
(custom ops, models/separable.py and models/depthwise.py). As in main.py on CPU, freed memory stays
mapped for reuse (``--no-keep-freed-memory``: glibc's default, which faults every step's memory
back in). Times are medians in seconds per step after the warm-up (which compiles); img/s from
them. Prints one line per phase and the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402,F401  (registers mg_ssaf_*)
from tools.benchmark import (BenchmarkError, add_keep_freed_memory_flag,  # noqa: E402
                             build_benchmark_model, model_specs, spec_name)
from utils import cpu_model, keep_freed_memory  # noqa: E402


def steps(model: nn.Module, phase: str, batch: int, img_size: int, dtype: str):
    """A training step (forward, cross-entropy, backward, AdamW) or an inference step of
    ``model`` on fixed random images, in float32 or under CPU autocast to bfloat16."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    torch.manual_seed(0)
    images = torch.randn(batch, 3, img_size, img_size).contiguous(
        memory_format=torch.channels_last)
    if phase == "infer":
        def step() -> None:
            with torch.inference_mode(), autocast:
                model(images)
        return step
    labels = torch.zeros(batch, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
    return step


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="mg_ssaf_t", help="a timm model name")
    source.add_argument("--cfg", metavar="YAML", help="an MG-SSAF config file, instead of --model")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides applied to --cfg")
    parser.add_argument("--train-batch-size", type=int, default=8,
                        help="training batch (--phases train)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="inference batch (--phases infer)")
    parser.add_argument("--img-size", type=int, default=224,
                        help="input resolution (a --cfg's DATA.IMG_SIZE becomes it)")
    parser.add_argument("--phases", nargs="+", default=["train"], choices=["train", "infer"],
                        help="what to time: the training step (forward, loss, backward, AdamW) "
                        "and/or inference")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per runner")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument("--dtype", nargs="+", default=["float32"],
                        choices=["float32", "bfloat16"],
                        help="float32, and/or bfloat16 autocast (slow on CPUs without AVX-512)")
    add_keep_freed_memory_flag(parser)
    args = parser.parse_args(argv)
    for name, least in (("steps", 1), ("warmup", 1), ("img_size", 1), ("batch_size", 1),
                        ("train_batch_size", 1), ("threads", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, "
                         f"got {getattr(args, name)}")
    if args.opts and not args.cfg:
        parser.error("--opts applies to --cfg only")
    if len(args.opts) % 2:
        parser.error(f"--opts expects KEY VALUE pairs, got {args.opts}")
    try:
        (args.spec,) = model_specs([args.cfg] if args.cfg else [],
                                   [] if args.cfg else [args.model], args.opts, "--model")
    except (BenchmarkError, ValueError, OSError) as err:
        parser.error(str(err))
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory and keep_freed_memory()
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"freed memory kept: {kept}")
    for dtype in args.dtype:
        for phase in args.phases:
            compare(args, phase, dtype)


def compare(args: argparse.Namespace, phase: str, dtype: str) -> None:
    """Times eager and compiled steps of one phase in one dtype, interleaved; prints the ratio."""
    batch = args.train_batch_size if phase == "train" else args.batch_size
    runners = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        try:
            model = build_benchmark_model(args.spec, args.img_size, args.opts)
        except ValueError as e:  # a config or input size the model refuses
            sys.exit(f"bench_compile.py: error: {e}")
        model = model.to(memory_format=torch.channels_last)
        model.train(phase == "train")
        runner = torch.compile(model) if name == "compiled" else model
        runners[name] = steps(runner, phase, batch, args.img_size, dtype)
    for name, step in runners.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        print(f"  {phase} {dtype} {name}: warm-up {time.perf_counter() - start:.1f} s",
              flush=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.steps):
        for name, step in runners.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{spec_name(args.spec)} {phase} {dtype} batch {batch}: "
          + ", ".join(f"{name} {medians[name]:.3f} s/step ({batch / medians[name]:.2f} img/s)"
                      for name in runners)
          + f"; compiled/eager speed {medians['eager'] / medians['compiled']:.3f}x", flush=True)

if __name__ == "__main__":
    main()
