"""Images/s of the training data pipeline alone: the training loader of a classification config
(decode, augmentation, collation, with DATA.NUM_WORKERS workers), no model.

    python tools/loader_speed.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml --data-path <imagenet> \
        --batches 20 --opts DATA.NUM_WORKERS 2 DATA.BATCH_SIZE 32

Prints images/s over ``--batches`` batches after ``--warmup`` untimed ones (at least one: the
clock starts when the last of them has arrived, so worker start-up is excluded), per epoch of
``--epochs``, then their median, and the CPU model; and what reseeding each sample from (SEED,
epoch, index) costs (data.samplers.SeededSamples), timed in the same run, as a share of the time
one sample takes a worker. An epoch must hold ``--warmup`` + ``--batches`` batches. Segmentation
configs (main_seg.py's loaders) are refused: the tool measures the classification loaders only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from data import DataError, build_loader  # noqa: E402
from data.build import require_classification_config  # noqa: E402
from utils import cpu_model, derive_seed, seed_all  # noqa: E402


def time_epoch(loader, epoch: int, warmup: int, batches: int) -> float:
    """Images/s over ``batches`` batches of ``epoch`` after ``warmup`` (at least 1) untimed ones:
    the clock starts when the last untimed batch has arrived."""
    loader.sampler.set_epoch(epoch)
    images, start = 0, 0.0
    for received, (samples, _) in enumerate(loader, start=1):
        if received == warmup:
            start = time.perf_counter()
        elif received > warmup:
            images += samples.size(0)
            if received == warmup + batches:
                break
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", required=True,
                        help="a classification config file (YAML; segmentation configs are "
                        "refused)")
    parser.add_argument("--data-path",
                        help="dataset root (DATA.DATA_PATH): the folder holding train/<class>/* "
                        "and val/<class>/* (DATA.DATASET imagenet) or the CUB_200_2011 folder "
                        "(cub); the digits dataset reads none (default: the config's "
                        "DATA.DATA_PATH)")
    parser.add_argument("--batches", type=int, default=20,
                        help="timed batches per epoch (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed batches per epoch before them, at least 1 (default: "
                        "%(default)s)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs (one timing each; default: %(default)s)")
    parser.add_argument("--opts", nargs="+", default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    for name, least in (("batches", 1), ("warmup", 1), ("epochs", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}, got {getattr(args, name)}")
    data_path = ["DATA.DATA_PATH", args.data_path] if args.data_path is not None else []
    try:
        config = load_config(args.cfg, [*data_path, *args.opts])
        require_classification_config(
            config, args.cfg, "loader_speed.py measures the classification training loaders "
            "only (DATA.DATASET 'imagenet', 'cub' or 'digits', main.py's)")
        loader = build_loader(config)[2]
        if len(loader) < args.warmup + args.batches:
            raise DataError(f"--warmup + --batches is {args.warmup + args.batches}, more than "
                            f"the {len(loader)} batches of an epoch (DATA.BATCH_SIZE "
                            f"{config.DATA.BATCH_SIZE})")
    except ValueError as e:  # ConfigError and DataError included
        parser.exit(1, f"loader_speed.py: error: {e}\n")
    rates = [time_epoch(loader, epoch, args.warmup, args.batches) for epoch in range(args.epochs)]
    rate = statistics.median(rates)
    print(f"{config.DATA.NUM_WORKERS} workers, batch {config.DATA.BATCH_SIZE}, "
          f"{config.DATA.IMG_SIZE}px: " + ", ".join(f"{r:.1f}" for r in rates)
          + f" images/s; median {rate:.1f} images/s on {cpu_model()}")
    calls = 2000
    reseed = timeit.timeit(lambda: seed_all(derive_seed(config.SEED, 1, 123456),
                                            accelerators=False), number=calls) / calls
    per_sample = max(1, config.DATA.NUM_WORKERS) / rate
    print(f"reseeding per sample: {reseed * 1e6:.1f} us, {100 * reseed / per_sample:.2f}% of the "
          f"{per_sample * 1e6:.0f} us a sample takes a worker (included in the figures above)")


if __name__ == "__main__":
    main()
