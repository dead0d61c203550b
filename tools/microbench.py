"""What the micro-benchmarks (bench_depthwise.py, bench_attention.py) share: their common
command-line flags and timing calls alternately, so that every variant sees the same machine load.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Hashable

import torch

WARMUP_ROUNDS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def alternate(calls: dict[Hashable, Callable[[], object]], repeats: int) -> dict[Hashable, float]:
    """Median ms of each call over ``repeats`` rounds, each round calling every one once, in
    order; ``WARMUP_ROUNDS`` rounds before them are left out of the medians."""
    times: dict[Hashable, list[float]] = {key: [] for key in calls}
    for _ in range(WARMUP_ROUNDS + repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values[WARMUP_ROUNDS:]) for key, values in times.items()}
