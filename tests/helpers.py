"""The tests' one helpers module: the golden network (``golden_model``), datasets to run on (tiny
ImageFolders, photo-sized JPEGs, a CUB and an ADE20K folder), the tiny model's config, runners for
the command lines (``python main.py ...``, ``main_seg.py``, ``tools/*.py``, torchrun, in
subprocesses on CPU, one thread), waiting for a log line, stop signals, and readers of what a run
leaves (metrics, step lines, the PREEMPTED marker, checkpoint digests), and a recorder of the
convolutions a forward runs (``ConvCalls``)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

from config import load_config
from models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(ROOT, "configs", "MG-SSAF", "MG-SSAF-T.yaml")
DEMO_CFG = os.path.join(ROOT, "configs", "demo", "MG-SSAF-nano-digits.yaml")
SEG_DEMO_CFG = os.path.join(ROOT, "configs", "seg", "upernet_mg_ssaf_nano_digits.yaml")
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

# Where the tests that opt in run (the golden tests, the compiled local attention's):
# MGSSAF_TEST_DEVICE=cuda runs them on the GPU (tools/gpu_check.py does); the default is the CPU.
TEST_DEVICE = os.environ.get("MGSSAF_TEST_DEVICE", "cpu")
ON_CUDA = TEST_DEVICE.startswith("cuda")

_cache: dict[str, str] = {}


def golden_model(reference_dir: str, name: str, local_attention: str = "ops"
                 ) -> tuple[torch.nn.Module, dict]:
    """The network of ``golden_tiny_<name>.pt`` with its weights (eval mode), and the file's
    contents (``input``, ``logits``, ``arch``)."""
    golden = torch.load(os.path.join(reference_dir, f"golden_tiny_{name}.pt"), weights_only=True)
    opts = ["MODEL.NAME", f"golden_tiny_{name}", "MODEL.MGSSAF.LOCAL_ATTENTION", local_attention]
    for key, value in golden["arch"].items():
        opts += [key, str(value)]
    model = build_model(load_config(None, opts)).eval()
    model.load_state_dict(golden["state_dict"])
    return model, golden


def device_under_test() -> torch.device:
    """``MGSSAF_TEST_DEVICE`` as a device; fails the test where it names CUDA and there is none
    (a GPU run that quietly ran on the CPU would prove nothing)."""
    if ON_CUDA and not torch.cuda.is_available():
        import pytest

        pytest.fail(f"MGSSAF_TEST_DEVICE={TEST_DEVICE}, but no CUDA device is available")
    return torch.device(TEST_DEVICE)


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """float32 matrix products and convolutions in IEEE float32 on CUDA (no TF32: cuDNN's
    convolutions default to it, 10-bit mantissas), as on the CPU; nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    # the flags of one API throughout (torch refuses to read flags set through both)
    matmul, saved = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


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


CUB_SPECIES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
CUB_TRAIN_PER_CLASS, CUB_TEST_PER_CLASS = 4, 2


def make_cub(root: str) -> str:
    """A CUB_200_2011 folder of 3 species: list files as released, JPEGs of bird-photo shapes;
    train and test images interleaved in images.txt as in the real file."""
    rng = np.random.default_rng(0)
    images, labels, split = [], [], []
    for c, species in enumerate(CUB_SPECIES, start=1):
        os.makedirs(os.path.join(root, "images", species))
        for i in range(CUB_TRAIN_PER_CLASS + CUB_TEST_PER_CLASS):
            name = f"{species}/{species.split('.')[1]}_{i:04d}_{100 + i}.jpg"
            height, width = (48, 64) if i % 2 else (64, 40)
            pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
            pixels[..., (c - 1) % 3] += 160
            Image.fromarray(pixels).save(os.path.join(root, "images", name), quality=90)
            images.append(name)
            labels.append(c)
            split.append(1 if i % 3 else 0)  # 4 train, 2 test per species
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.writelines(f"{c} {s}\n" for c, s in enumerate(CUB_SPECIES, start=1))
    for name, values in (("images.txt", images), ("image_class_labels.txt", labels),
                         ("train_test_split.txt", split)):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(f"{i} {v}\n" for i, v in enumerate(values, start=1))
    return root


def _ade20k_item(rng: np.random.Generator, i: int) -> tuple[np.ndarray, np.ndarray]:
    """A 96x64 noise image and labels 0 (ignored) on its left quarter, 1..150 elsewhere."""
    label = rng.integers(1, 151, (64, 96), dtype=np.uint8)
    label[:, :24] = 0
    return rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), label


def make_ade20k(root: str, counts: tuple[int, int] = (4, 3),
                draw: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
                = _ade20k_item) -> str:
    """The ADEChallengeData2016 layout: ``counts`` training and validation pairs of
    ``images/<split>/ADE_<split>_<i>.jpg`` and ``annotations/<split>/ADE_<split>_<i>.png``;
    ``draw(rng, i)`` gives pair i's image (HxWx3) and labels (HxW)."""
    rng = np.random.default_rng(0)
    for split, count in zip(("training", "validation"), counts):
        os.makedirs(os.path.join(root, "images", split))
        os.makedirs(os.path.join(root, "annotations", split))
        for i in range(count):
            name = f"ADE_{split}_{i:08d}"
            image, label = draw(rng, i)
            Image.fromarray(image).save(os.path.join(root, "images", split, f"{name}.jpg"))
            Image.fromarray(label).save(os.path.join(root, "annotations", split, f"{name}.png"))
    return str(root)


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


def read(path: str, default: str | None = None) -> str:
    """The text of ``path``; ``default`` where it does not exist (None: an error)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        if default is None:
            raise
        return default


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen, timeout: float = 180,
             poll: float = 0.02, log: str | None = None) -> None:
    """Waits until ``predicate()`` holds while ``process`` runs; fails if it ends or times out
    (with the end of the run's output file ``log``, if given)."""
    deadline = time.time() + timeout
    while not predicate():
        tail = "" if log is None else ":\n" + read(log, "")[-3000:]
        assert process.poll() is None, f"the run ended early with code {process.returncode}{tail}"
        assert time.time() < deadline, "timed out" + tail
        time.sleep(poll)


def wait_for_line(path: str, text: str, process: subprocess.Popen, timeout: float = 180,
                  poll: float = 0.02, log: str | None = None) -> None:
    """Waits until the file ``path`` (a run's log_rank0.txt, say) holds ``text``."""
    wait_for(lambda: text in read(path, ""), process, timeout, poll, log)


def start(argv: list[str], log: str, prefix: tuple[str, ...] = ("main.py",),
          env: dict[str, str] | None = None, new_session: bool = False) -> subprocess.Popen:
    """Starts ``python *prefix *argv`` in the background, its output going to the file ``log``;
    ``env``: variables added to :func:`child_env`; ``new_session``: in a session (and process
    group) of its own, so that a signal can go to the whole group."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *prefix, *argv], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**child_env(), **(env or {})},
                                start_new_session=new_session)


def interrupt(argv: list[str], folder: str, log: str, prefix: tuple[str, ...], sig: int,
              to_group: bool, step: int = 3) -> int:
    """Starts a run in its own session, sends ``sig`` once rank 0 has logged ``step`` of epoch 0
    (to the whole process group, or to the launched process alone); returns the exit code."""
    process = start(argv, log, prefix, new_session=True)
    wait_for_line(os.path.join(folder, "log_rank0.txt"), f"Train: [0/2][{step}/", process,
                  log=log)
    if to_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    return process.wait(timeout=120)


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...); []
    for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and stat_fields(int(entry))[1:2] == [str(pid)]]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children(current)
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL to ``pid`` and every process below it at once (loader workers; torchrun starts each
    rank in a session of its own: killing torchrun's process group would leave the ranks
    running)."""
    for member in descendants(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies count as ended)."""
    return [pid for pid in pids if stat_fields(pid)[:1] not in ([], ["Z"])]


def still_running_after(pids: list[int], timeout: float) -> list[int]:
    """Those of ``pids`` that still run after up to ``timeout`` seconds of waiting for them."""
    deadline = time.time() + timeout
    while running(pids) and time.time() < deadline:
        time.sleep(0.2)
    return running(pids)


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


def run_cli(argv: list[str], prefix: tuple[str, ...] = ("main.py",), timeout: float = 240,
            env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    """Runs ``python *prefix *argv`` in the repository (``prefix`` may hold a launcher before
    main.py) in the environment ``env`` (default: :func:`child_env`); ``stdout`` holds stdout
    and stderr together. One still running after ``timeout`` seconds fails the test with the end
    of its output, after it is killed with every process it started."""
    code, output = run_cli_or_kill(argv, prefix, timeout, env, **popen)
    if code is None:
        raise AssertionError(f"{' '.join(prefix)[:200]} did not finish within {timeout} s "
                             "(killed with every process it started); its output ends:\n"
                             f"{output[-4000:]}")
    return subprocess.CompletedProcess([sys.executable, *prefix, *argv], code, output)


def run_cli_or_kill(argv: list[str], prefix: tuple[str, ...], timeout: float = 180,
                    env: dict[str, str] | None = None, **popen) -> tuple[int | None, str]:
    """Runs a CLI command as :func:`run_cli` does; one still running after ``timeout`` seconds is
    killed with every process it started (loader workers, torchrun's ranks, which have sessions
    of their own) and gives None as exit code."""
    process = subprocess.Popen([sys.executable, *prefix, *argv], cwd=ROOT,
                               env=child_env() if env is None else env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, **popen)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        try:
            return None, process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired as e:  # the pipe held by a process outside the tree
            output = e.output or ""
            return None, output.decode(errors="replace") if isinstance(output, bytes) else output


def run_tool(*args: str, timeout: float | None = 300) -> subprocess.CompletedProcess:
    """Runs ``python *args`` (a tool: ``tools/plot_metrics.py ...``) in the repository with this
    process's environment; ``stdout`` and ``stderr`` apart."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
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


def read_marker(folder: str) -> dict[str, str] | None:
    """The run folder's PREEMPTED marker as a dict (None: there is none)."""
    text = read(os.path.join(folder, "PREEMPTED"), "")
    return dict(line.split("=", 1) for line in text.splitlines()) if text else None


def folder_bytes(folder: str) -> dict[str, bytes]:
    """Every file of ``folder`` with its bytes."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


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


class Evil:
    """Unpickling this creates a file: a stand-in for code hidden in a stranger's checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def evil_checkpoint(path: str, marker: str, zipped: bool = True) -> str:
    """A checkpoint at ``path`` whose loading with pickle would create the file ``marker``."""
    torch.save({"model": {}, "payload": Evil(marker)}, path,
               _use_new_zipfile_serialization=zipped)
    return path


def copy_run(src: str, dst_output: str, tag: str) -> str:
    """A copy of run folder ``src`` as ``<dst_output>/<MODEL_NAME>/<tag>``."""
    dst = run_dir(dst_output, tag)
    shutil.copytree(src, dst)
    return dst


class ConvCalls(TorchFunctionMode):
    """Records every convolution run under it: ``F.conv2d``, the depthwise custom op, and
    ``F.linear`` of a 4-D map (a 1x1 convolution as a matrix product, ``models/pointwise.py``).
    ``calls`` holds each one's (input dtype, weight dtype, whether CPU autocast was on);
    ``matrix_products`` counts the ``F.linear`` ones."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.dtype, torch.dtype, bool]] = []
        self.matrix_products = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        matrix_product = func is F.linear and args[0].dim() == 4
        if matrix_product or func in (F.conv2d, torch.ops.mgssaf.depthwise_conv2d.default):
            self.calls.append((args[0].dtype, args[1].dtype, torch.is_autocast_enabled("cpu")))
            self.matrix_products += matrix_product
        return func(*args, **(kwargs or {}))
