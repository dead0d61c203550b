"""Atomic, checksummed saves, seeding, the run folder's lock and distributed helpers
(engine/checkpoint.py builds the run's checkpoints on them; models/checkpoint_io.py is the one
safe reader of checkpoints)."""
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
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.checkpoint_io import append_checksum



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


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (what ``lscpu`` shows), from
    /proc/cpuinfo; the platform's processor string elsewhere. Benchmarks print it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine() or "unknown CPU"
    fields = {}
    for key in ("model name", "cpu family", "model"):
        found = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        fields[key] = found.group(1).strip() if found else "?"
    return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"


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


def _store_keys(tag: str) -> tuple[Any, str]:
    """The process group's key-value store (torchrun's agent holds it, else rank 0) and the key
    prefix of ``tag`` in this launch (a torchrun restart starts afresh)."""
    prefix = f"mg_ssaf/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{tag}/"
    return dist.distributed_c10d._get_default_store(), prefix


def check_in(tag: str, timeout: float, wait: bool = True) -> list[int] | None:
    """Records in the process group's store that this rank reached the point ``tag``, then
    (``wait``) waits up to ``timeout`` s for the other ranks to reach it too; returns the ranks
    that did not (dead or stuck), [] when all did (or without ``wait``), or None when the store
    cannot be reached. No collective: it works while collectives fail."""
    if get_world_size() == 1:
        return []
    try:
        store, prefix = _store_keys(tag)
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


def record_failure(message: str) -> None:
    """Records in the process group's store why this rank fails, so that the other ranks, whose
    collectives fail once it is gone, can say so (:func:`recorded_failures`); a no-op with one
    process or without a store."""
    if get_world_size() == 1:
        return
    try:
        store, prefix = _store_keys("cause")
        store.set(prefix + str(get_rank()), message)
    except Exception:  # the store's host is gone
        pass


def recorded_failures() -> dict[int, str]:
    """The other ranks' :func:`record_failure` messages by rank ({} when none, or no store)."""
    try:
        store, prefix = _store_keys("cause")
        return {r: store.get(prefix + str(r)).decode("utf-8", "replace")
                for r in range(get_world_size())
                if r != get_rank() and store.check([prefix + str(r)])}
    except Exception:  # the store's host is gone
        return {}


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on CPU), so that timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------
def prepare_output_dir(path: str) -> list[str]:
    """Creates ``path`` if needed and checks that files can be written there; returns the
    folders it created, outermost first (for :func:`remove_empty_folders`)."""
    created, parent = [], os.path.abspath(path)
    while not os.path.exists(parent):
        created.insert(0, parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise RunError(f"output folder {path} cannot be written: {e.strerror or e}") from None
    return created


def remove_empty_folders(folders: list[str]) -> None:
    """Removes those of ``folders`` (outermost first) that are empty, innermost first: what
    :func:`prepare_output_dir` created for a run that failed before writing anything."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)  # only an empty folder
        except OSError:
            return


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

