"""Checkpoints (atomic saves, pruning, auto-resume), seeding and distributed helpers.

Checkpoints are read by the one safe reader of models/checkpoint_io.py (``load_checkpoint_file``,
``load_weights``, ``load_pretrained``), which models/ needs for timm's ``pretrained=True`` path."""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import random
import re
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from yacs.config import CfgNode as CN

from models.checkpoint_io import CheckpointError, append_checksum, load_checkpoint_file

CHECKPOINT_RE = re.compile(r"^ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$")
BEST_CHECKPOINT = "ckpt_best.pth"
# What a killed save leaves: atomic_save's temporary files and the marker's.
LEFTOVER_TMP_RE = re.compile(r"^(\.ckpt_.*\.pth\..*\.tmp|PREEMPTED\.tmp)$")


class RunError(Exception):
    """A problem with the run's inputs or state, reported to the user without a traceback
    (as is models.checkpoint_io.CheckpointError, which models/ raises)."""


class SaveError(RunError):
    """An OS error (disk full, quota, permissions, I/O) while writing a checkpoint."""


# ---------------------------------------------------------------------------------------------
# CPU memory
# ---------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>


def uses_glibc_malloc() -> bool:
    """True where malloc is glibc's: a glibc system with no allocator preloaded (LD_PRELOAD)."""
    return platform.libc_ver()[0] == "glibc" and "malloc" not in os.environ.get("LD_PRELOAD", "")


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for the next allocation instead of returning it.

    By default glibc serves large blocks (activations, gradients) with mmap and unmaps them when
    freed, so every training or inference step faults the same memory back in, page by page
    (README, Performance). Without mmap and with trimming off, a step reuses the memory of the
    step before; the process then holds its peak memory until it exits. Returns True when both
    settings took effect, False (changing nothing) where malloc is not glibc's.
    """
    if not uses_glibc_malloc():
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 switches trimming off (mallopt(3))
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------
def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks, so that every rank takes the same decision."""
    return [v > 0 for v in all_reduce_sum([float(f) for f in flags], device)]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Gives every rank rank 0's buffers (BatchNorm running statistics): without SyncBatchNorm
    (CPU runs) each rank's statistics follow its own batches after DDP's last broadcast, and
    rank 0's are the ones a checkpoint keeps, so every rank evaluates what is saved."""
    if get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


def check_in(tag: str, timeout: float, wait: bool = True) -> list[int] | None:
    """Records in the process group's key-value store (torchrun's agent holds it, else rank 0)
    that this rank reached the point ``tag``, then (``wait``) waits up to ``timeout`` s for the
    other ranks to reach it too; returns the ranks that did not (dead or stuck), [] when all did
    (or without ``wait``), or None when the store cannot be reached. No collective: it works
    while collectives fail."""
    if get_world_size() == 1:
        return []
    prefix = f"mg_ssaf/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{tag}/"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(prefix + str(get_rank()), "1")
        if not wait:
            return []
        deadline = time.monotonic() + timeout
        while True:
            missing = [r for r in range(get_world_size()) if not store.check([prefix + str(r)])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.05)
    except Exception:  # the store's host is gone too, or the store was torn down
        return None


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on CPU), so that timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------
def prepare_output_dir(path: str) -> None:
    """Creates ``path`` if needed and checks that files can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise RunError(f"output folder {path} cannot be written: {e.strerror or e}") from None


LOCK_FILE = "RUNNING"          # in the run folder while a training run holds it
LOCK_REFRESH_S = 10.0          # the holder touches it this often (a lease)
LOCK_STALE_S = 60.0            # not touched for this long: its holder is gone, the lock is free


def _fs_now(folder: str) -> float:
    """The time on the clock of ``folder``'s filesystem (the modification time of a new file),
    so that leases written from other nodes compare without clock skew."""
    with tempfile.TemporaryFile(dir=folder) as f:
        return os.fstat(f.fileno()).st_mtime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """OUTPUT/RUNNING while a training run uses the folder: ``host=`` and ``pid=`` of its holder,
    kept as a lease (its modification time refreshed every LOCK_REFRESH_S by a thread). Another
    run is refused while the lease is fresh; one that was not refreshed for LOCK_STALE_S (a
    killed run, a lost node), or whose holder on this host is gone, is taken over."""
    held: list["RunLock"] = []

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, LOCK_FILE)
        self.content = (f"host={socket.gethostname()}\npid={os.getpid()}\n"
                        f"started={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
        except OSError:
            return {}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self.content)
        return True

    def acquire(self, logger: logging.Logger | None = None) -> None:
        """Takes the lock, waiting up to LOCK_STALE_S for one whose lease looks lapsed (not
        refreshed for 3 x LOCK_REFRESH_S) to go stale; raises RunError while another run holds
        it."""
        folder = os.path.dirname(self.path)
        while not self._create():
            holder = self._holder()
            try:
                age = _fs_now(folder) - os.stat(self.path).st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            host, pid = holder.get("host", "?"), holder.get("pid", "?")
            gone = host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))
            if gone or age > LOCK_STALE_S:
                why = (f"process {pid} is gone" if gone else
                       f"not refreshed for {age:.0f} s, stale after {LOCK_STALE_S:.0f} s")
                message = f"taking over the lock {self.path} of host {host} pid {pid} ({why})"
                if logger is not None:
                    logger.warning(message)
                else:
                    print(f"warning: {message}", file=sys.stderr, flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            if age <= 3 * LOCK_REFRESH_S:
                raise RunError(
                    f"{folder} is in use by another training run: host {host}, pid {pid} (its "
                    f"lock {self.path} was refreshed {max(age, 0):.0f} s ago; a lock not "
                    f"refreshed for {LOCK_STALE_S:.0f} s is taken over). Use another --tag or "
                    f"--output, or stop that run")
            time.sleep(min(2.0, LOCK_STALE_S - age + 0.1))  # lapsing: refreshed again, or stale
        self._thread = threading.Thread(target=self._refresh, name="run-lock-lease", daemon=True)
        self._thread.start()
        RunLock.held.append(self)

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stops the lease and removes the lock if it is still this run's."""
        self._stop.set()
        if self in RunLock.held:
            RunLock.held.remove(self)
        try:
            with open(self.path, encoding="utf-8") as f:
                if f.read() == self.content:
                    os.remove(self.path)
        except OSError:
            pass


def release_run_locks() -> None:
    """Releases every RunLock this process holds (before an ``os._exit``)."""
    for lock in list(RunLock.held):
        lock.release()


# ---------------------------------------------------------------------------------------------
# Random draws as functions of (SEED, epoch, step or sample index)
# ---------------------------------------------------------------------------------------------
def derive_seed(*keys: int) -> int:
    """A 64-bit seed that depends on every one of ``keys`` (non-negative integers such as SEED,
    epoch, step, rank or sample index), hashed by NumPy's SeedSequence: neighbouring keys give
    unrelated streams."""
    high, low = np.random.SeedSequence(list(keys)).generate_state(2)
    return int(high) << 32 | int(low)


def seed_all(seed: int, accelerators: bool = True) -> None:
    """Seeds python's ``random``, NumPy's global generator and torch's CPU generator, and with
    ``accelerators`` torch's CUDA (and other device) generators too. Those take ~90 us, 20 times
    the rest: per-sample seeding in loaders, which draw on the CPU only, leaves them out."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    if accelerators:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def _os_error(error: BaseException) -> OSError | None:
    """The OSError that ``error`` is or was raised from (torch.save wraps a failed write of the
    file object in a RuntimeError of its own), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, its SHA-256 appended
    (models.checkpoint_io.append_checksum), fsync, then rename over ``path``: ``path`` is either
    the old file or the complete new one, never a partial write. An OS error (disk full, ...)
    raises SaveError naming ``path`` and the error, the temporary file removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=folder)
        with os.fdopen(fd, "w+b") as f:
            torch.save(obj, f)
            f.flush()
            append_checksum(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        error = _os_error(e)
        if error is None:
            raise
        raise SaveError(f"cannot save {path}: {error.strerror or error}"
                        + (f" (errno {error.errno})" if error.errno else "")
                        + "; the files saved before are intact") from None


def remove_leftover_temp_files(folder: str, logger: logging.Logger) -> None:
    """Removes the temporary files of saves that a kill interrupted (call with the run's lock)."""
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if LEFTOVER_TMP_RE.match(name):
            os.remove(os.path.join(folder, name))
            logger.info(f"removed {os.path.join(folder, name)}, left by an interrupted save")


def checkpoint_name(epoch: int, epoch_step: int | None = None) -> str:
    """``ckpt_epoch_{epoch}.pth`` after a whole epoch, ``ckpt_epoch_{epoch}_step_{n}.pth`` after
    ``n`` loader steps of it."""
    if epoch_step is None:
        return f"ckpt_epoch_{epoch}.pth"
    return f"ckpt_epoch_{epoch}_step_{epoch_step}.pth"


def list_checkpoints(folder: str) -> list[tuple[int, float, str]]:
    """``(epoch, step, path)`` of the epoch checkpoints in ``folder``, oldest first; a whole-epoch
    checkpoint has step ``inf`` (it comes after every mid-epoch one of the same epoch)."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = CHECKPOINT_RE.match(name)
        if match:
            step = float("inf") if match.group(2) is None else int(match.group(2))
            found.append((int(match.group(1)), step, os.path.join(folder, name)))
    return sorted(found)


def prune_checkpoints(folder: str, epoch: int, keep: int, logger: logging.Logger) -> None:
    """After the whole-epoch checkpoint of ``epoch`` is saved: removes mid-epoch checkpoints up to
    ``epoch`` and whole-epoch ones older than the newest ``keep`` (``keep`` 0 keeps them all).
    Checkpoints of later epochs (another run's) are left alone, and so is every file that does
    not load (unreadable, corrupt, refused): it is named in a warning, never deleted."""
    older = [(step, path) for e, step, path in list_checkpoints(folder) if e <= epoch]
    whole = [path for step, path in older if step == float("inf")]
    stale = [path for step, path in older if step != float("inf")]
    if keep > 0:
        stale += whole[:-keep]
    for path in stale:
        try:
            load_checkpoint_file(path)
        except CheckpointError as e:
            logger.warning(f"not pruned, as it does not load: {e}; delete it yourself once "
                           "you have looked at it")
            continue
        os.remove(path)
        logger.info(f"removed old checkpoint {path}")


def save_checkpoint(config: CN, epoch: int, model: torch.nn.Module, max_accuracy: float,
                    optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                    scaler: torch.amp.GradScaler, logger: logging.Logger, *, num_updates: int,
                    epoch_step: int | None = None, train_loss: tuple[float, float] = (0.0, 0.0),
                    is_best: bool = False, save_epoch: bool = True,
                    model_ema: torch.nn.Module | None = None,
                    class_names: Sequence[str] | None = None) -> None:
    """Saves the training state (rank 0 writes, the other ranks return; no collective, so a rank
    can save while its peers are gone).

    Contents: ``model, optimizer, lr_scheduler, scaler, epoch, max_accuracy, config`` as released
    checkpoints have them, plus ``epoch_step`` (loader steps done in ``epoch``; None after the
    whole epoch), ``num_updates`` (optimizer steps so far), ``train_loss`` (sum and count of the
    epoch's losses so far, over all ranks), ``world_size`` (processes of the run) and, with
    MODEL_EMA, ``model_ema`` (the EMA weights), and ``class_names`` (the dataset's class names,
    in the order of the logits; tools/predict.py prints them). No RNG state: every random draw
    of training is a function of SEED, epoch and step or sample."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "max_accuracy": float(max_accuracy),
        "config": config,
        "epoch_step": epoch_step,
        "num_updates": num_updates,
        "train_loss": tuple(train_loss),
        "world_size": get_world_size(),
    }
    if model_ema is not None:
        state["model_ema"] = model_ema.state_dict()
    if class_names is not None:
        state["class_names"] = [str(name) for name in class_names]
    if get_rank() != 0:
        return
    if is_best:
        # Before the epoch checkpoint: a crash in between leaves the epoch to run again (its
        # checkpoint is not there), which saves the best again. The other order would leave an
        # epoch checkpoint whose max_accuracy no later epoch beats, and no best checkpoint.
        path = os.path.join(config.OUTPUT, BEST_CHECKPOINT)
        atomic_save(state, path)
        logger.info(f"{path} saved (best validation score {max_accuracy:.3f})")
    if save_epoch:
        path = os.path.join(config.OUTPUT, checkpoint_name(epoch, epoch_step))
        if os.path.exists(path):
            # Only after a resume from an older checkpoint, e.g. when auto-resume skipped this
            # one as unreadable: keep it, under another name, rather than write over it.
            kept = f"{path}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(path, kept)
            logger.warning(f"{path} already exists (auto-resume skipped it, or the run resumed "
                           f"from an older checkpoint): kept as {kept}")
        logger.info(f"saving {path}")
        atomic_save(state, path)
        logger.info(f"{path} saved")
        if epoch_step is None:
            prune_checkpoints(config.OUTPUT, epoch, config.TRAIN.KEEP_CHECKPOINTS, logger)


# ---------------------------------------------------------------------------------------------
# Auto-resume (reading a checkpoint: models/checkpoint_io.py)
# ---------------------------------------------------------------------------------------------
def newest_loadable_checkpoint(folder: str, logger: logging.Logger) -> tuple[str, dict] | None:
    """The newest epoch checkpoint in ``folder`` that loads, with its contents; unreadable or
    refused ones are reported and skipped (left in place)."""
    for _, _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint_file(path)
        except CheckpointError as e:
            logger.warning(f"auto-resume skips {e}")
    return None


def find_resume_checkpoint(folder: str, logger: logging.Logger) -> tuple[str, dict] | None:
    """The checkpoint to auto-resume from, the same on every rank (a collective): rank 0 picks the
    newest loadable one in ``folder`` and sends its path; the other ranks load that path. A rank
    that cannot load it makes every rank raise CheckpointError naming the rank and the file."""
    if get_world_size() == 1:
        return newest_loadable_checkpoint(folder, logger)
    found = newest_loadable_checkpoint(folder, logger) if get_rank() == 0 else None
    chosen = [found[0] if found else None]
    dist.broadcast_object_list(chosen, src=0)
    path, error = chosen[0], None
    if path is not None and get_rank() != 0:
        try:
            found = path, load_checkpoint_file(path)
        except CheckpointError as e:
            error = str(e)
    errors: list[Any] = [None] * get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if failed:
        rank, message = failed[0]
        raise CheckpointError(f"auto-resume: rank 0 chose {path}, but rank {rank} cannot load it "
                              f"({message}); the output folder must be one that every node "
                              f"sees (a shared filesystem)")
    return found


def restore_training_state(ckpt: dict, path: str, optimizer: torch.optim.Optimizer,
                           lr_scheduler: Any, scaler: torch.amp.GradScaler) -> None:
    """Restores optimizer, LR scheduler and loss scaler from ``ckpt``."""
    for key in ("optimizer", "lr_scheduler"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: has no '{key}' entry: it holds weights only; "
                                  "use --pretrained to start training from it")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run: {e}") from None
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
