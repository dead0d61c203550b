"""Shared pieces of the pipeline tests: tiny ImageFolders, a tiny model config and a runner for the
real command line (``python main.py ...`` in a subprocess, on CPU, one thread)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Callable

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "MG-SSAF", "MG-SSAF-T.yaml")
MODEL_NAME = "mg_ssaf_test"  # MODEL.NAME of TINY: runs write to <output>/mg_ssaf_test/<tag>
NUM_CLASSES = 3
TRAIN_PER_CLASS = 5  # 15 training images
VAL_PER_CLASS = 3    # 9 validation images: odd, so two ranks get 5 and 4

# A tiny network at 32x32 and a short, fast schedule (the LR is scaled by batch / 512). It is
# not MG-SSAF-T, so it has a name of its own (MODEL.NAME mg_ssaf_tiny stands for T's architecture).
TINY_MODEL = ["MODEL.NAME", MODEL_NAME, "MODEL.MGSSAF.EMBED_DIM", "24",
              "MODEL.MGSSAF.DEPTHS", "[1,1,1,1]", "MODEL.MGSSAF.NUM_HEADS", "[1,6,6,2]",
              "MODEL.MGSSAF.HEAD_HIDDEN_DIM", "64", "MODEL.NUM_CLASSES", str(NUM_CLASSES)]
TINY = [*TINY_MODEL, "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
        "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.BASE_LR", "0.2", "PRINT_FREQ", "1",
        "AMP_ENABLE", "false"]
NO_AUG = ["AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "AUG.AUTO_AUGMENT", "none", "AUG.REPROB", "0.0",
          "AUG.COLOR_JITTER", "0.0"]

_cache: dict[str, str] = {}


def _write_imagefolder(root: str, classes: int, counts: tuple[int, int], class_dir: str,
                       draw: Callable[[np.random.Generator, int, int], tuple[Image.Image, str]]
                       ) -> str:
    """``root/{train,val}/<class_dir % c>/<file>`` with ``counts`` images per class of each split;
    ``draw(rng, c, i)`` gives image i of class c and its file name."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), counts):
        for c in range(classes):
            folder = os.path.join(root, split, class_dir % c)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image, name = draw(rng, c, i)
                image.save(os.path.join(folder, name), quality=90)
    return root


def make_imagefolder(root: str, classes: int = NUM_CLASSES, train_per_class: int = TRAIN_PER_CLASS,
                     val_per_class: int = VAL_PER_CLASS, size: int = 32) -> str:
    """``root/{train,val}/class{c}/{i}.png``: noise tinted by class (learnable classes)."""
    def draw(rng: np.random.Generator, c: int, i: int) -> tuple[Image.Image, str]:
        pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        pixels[..., c % 3] += 160
        return Image.fromarray(pixels), f"{i}.png"

    return _write_imagefolder(root, classes, (train_per_class, val_per_class), "class%d", draw)


def make_jpeg_folder(root: str, classes: int = NUM_CLASSES, train_per_class: int = 8,
                     val_per_class: int = 2) -> str:
    """``root/{train,val}/n0000000{c}/{i}.JPEG`` of ImageNet-like sizes (500x375 landscape and
    333x500 portrait photos): smooth class-tinted gradients with noise, JPEG quality 90."""
    def draw(rng: np.random.Generator, c: int, i: int) -> tuple[Image.Image, str]:
        width, height = (500, 375) if i % 2 == 0 else (333, 500)
        ramp = np.linspace(0, 120, width, dtype=np.float32)[None, :, None]
        pixels = rng.normal(60, 25, (height, width, 3)).astype(np.float32) + ramp
        pixels[..., c % 3] += 80
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), f"{i}.JPEG"

    return _write_imagefolder(root, classes, (train_per_class, val_per_class), "n%08d", draw)


def shared_dataset(base: str) -> str:
    """One tiny ImageFolder per test session (under pytest's base temp folder)."""
    root = os.path.join(base, "shared_imagefolder")
    if root not in _cache:
        _cache[root] = make_imagefolder(root)
    return _cache[root]


def without(opts: list[str] | tuple[str, ...], *keys: str) -> list[str]:
    """``opts`` (KEY VALUE pairs) less the pairs of ``keys``: e.g. TINY with AMP as configured."""
    return [v for key, value in zip(opts[::2], opts[1::2]) if key not in keys
            for v in (key, value)]


def torchrun(nproc: int = 2, script: str = "main.py") -> tuple[str, ...]:
    """The ``prefix`` of :func:`run_cli` that launches ``script`` on ``nproc`` CPU processes."""
    return ("-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", script)


def rank_logs(folder: str, nproc: int = 2) -> list[str]:
    """``log_rank<r>.txt`` of each rank of the run folder."""
    logs = []
    for rank in range(nproc):
        with open(os.path.join(folder, f"log_rank{rank}.txt"), encoding="utf-8") as f:
            logs.append(f.read())
    return logs


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen, timeout: float = 180,
             poll: float = 0.02) -> None:
    """Waits until ``predicate()`` holds while ``process`` runs; fails if it ends or times out."""
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended early with code {process.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of a CLI run: one CPU thread (2 busy cores), no launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def main_args(data: str, output: str, tag: str, *opts: str, flags: tuple[str, ...] = (),
              batch_size: int = 4) -> list[str]:
    """Arguments of main.py for the tiny model; ``opts`` are extra KEY VALUE pairs."""
    return ["--cfg", CFG, "--data-path", data, "--output", output, "--tag", tag,
            "--batch-size", str(batch_size), *flags, "--opts", *TINY, *opts]


def run_cli(argv: list[str], prefix: tuple[str, ...] = ("main.py",), timeout: float = 240
            ) -> subprocess.CompletedProcess:
    """Runs ``python *prefix *argv`` in the repository (``prefix`` may hold a launcher before
    main.py); ``stdout`` holds stdout and stderr together."""
    return subprocess.run([sys.executable, *prefix, *argv], cwd=ROOT, env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def run_dir(output: str, tag: str) -> str:
    return os.path.join(output, MODEL_NAME, tag)


def step_lines(output: str) -> list[tuple[int, int]]:
    """(epoch, loader step) of each ``Train: [epoch/E][step/S]`` line of a run's output, in order:
    where a rerun starts, and that it did not redo finished steps."""
    return [(int(e), int(s)) for e, s in re.findall(r"Train: \[(\d+)/\d+\]\[(\d+)/\d+\]", output)]


def read_metrics(folder: str) -> dict[int, dict]:
    """metrics.jsonl by epoch (the last line of an epoch wins, as after a resume)."""
    rows: dict[int, dict] = {}
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows[row["epoch"]] = row
    return rows


def digests(folder: str) -> dict[str, str]:
    """SHA-256 of every checkpoint in ``folder``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pth"):
            with open(os.path.join(folder, name), "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


# The reference run: 4 epochs with augmentation and Mixup on, deterministic settings.
REFERENCE_OPTS = ("TRAIN.EPOCHS", "4", "TRAIN.KEEP_CHECKPOINTS", "2", "DETERMINISTIC", "true")


def reference_run(base: str) -> str:
    """The folder of one uninterrupted 4-epoch run per session (shared, treat as read-only)."""
    output = os.path.join(base, "reference_runs")
    folder = run_dir(output, "reference")
    if folder not in _cache:
        result = run_cli(main_args(shared_dataset(base), output, "reference", *REFERENCE_OPTS))
        assert result.returncode == 0, result.stdout[-4000:]
        _cache[folder] = result.stdout
    return folder


def reference_log(base: str) -> str:
    """Console output of :func:`reference_run`."""
    return _cache[reference_run(base)]


def copy_run(src: str, dst_output: str, tag: str) -> str:
    """A copy of run folder ``src`` as ``<dst_output>/<MODEL_NAME>/<tag>``."""
    dst = run_dir(dst_output, tag)
    shutil.copytree(src, dst)
    return dst
