"""Atomic, checksummed saves and the safe checkpoint reader, seeding, the run folder's lock and
distributed helpers (engine/checkpoint.py builds the run's checkpoints on them)."""
from __future__ import annotations

import collections
import ctypes
import hashlib
import logging
import os
import pickle
import platform
import random
import re
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from yacs.config import CfgNode as CN

from config import VARIANTS

TORCH_SAVE_MAGIC = (b"PK", b"\x80")  # torch.save's zip format; its legacy format (a pickle)
# The SHA-256 of a checkpoint, inside the file: the comment of its zip archive (the last bytes of
# the file), over every byte before the comment's 2-byte length field. Written by atomic_save
# before the rename, verified by load_checkpoint_file.
CHECKSUM_TAG = b"mg-ssaf-sha256:"
_CHECKSUM_LEN = len(CHECKSUM_TAG) + 64
_EOCD_SIG, _EOCD_LEN = b"PK\x05\x06", 22  # zip end-of-central-directory record, without comment


class RunError(Exception):
    """A problem with the run's inputs or state, reported to the user without a traceback."""


class CheckpointError(RunError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit the model."""


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
    (docs/performance.md). Without mmap and with trimming off, a step reuses the memory of the
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


def _sha256(f, size: int) -> str:
    """SHA-256 of the first ``size`` bytes of the binary file ``f``."""
    digest = hashlib.sha256()
    f.seek(0)
    left = size
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        digest.update(block)
        left -= len(block)
    return digest.hexdigest()


def _append_checksum(f) -> None:
    """Writes the SHA-256 of the zip archive ``f`` (just written by torch.save) as its comment."""
    size = f.seek(0, os.SEEK_END)
    f.seek(size - _EOCD_LEN)
    eocd = f.read(_EOCD_LEN)
    if not eocd.startswith(_EOCD_SIG) or eocd[-2:] != b"\0\0":
        return  # not the zip layout torch.save writes: saved without a checksum
    comment = CHECKSUM_TAG + _sha256(f, size - 2).encode()
    f.seek(size - 2)
    f.write(struct.pack("<H", len(comment)) + comment)


def verify_checksum(path: str) -> bool:
    """Checks the SHA-256 that atomic_save wrote into ``path``: True when it matches, False when
    the file has none (released checkpoints, older ones); a mismatch raises CheckpointError."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = _EOCD_LEN + _CHECKSUM_LEN
        if size < tail_len:
            return False
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        comment = tail[_EOCD_LEN:]
        if (not tail.startswith(_EOCD_SIG) or not comment.startswith(CHECKSUM_TAG)
                or struct.unpack("<H", tail[_EOCD_LEN - 2:_EOCD_LEN])[0] != _CHECKSUM_LEN):
            return False
        stored = comment[len(CHECKSUM_TAG):].decode("ascii", "replace")
        actual = _sha256(f, size - _CHECKSUM_LEN - 2)
    if stored != actual:
        raise CheckpointError(f"{path}: corrupt: its SHA-256 checksum does not match its contents "
                              f"(stored {stored[:12]}..., computed {actual[:12]}...)")
    return True


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, its SHA-256 appended (see
    CHECKSUM_TAG), fsync, then rename over ``path``: ``path`` is either the old file or the
    complete new one, never a partial write. An OS error (disk full, ...) raises SaveError naming
    ``path`` and the error, the temporary file removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=folder)
        with os.fdopen(fd, "w+b") as f:
            torch.save(obj, f)
            f.flush()
            _append_checksum(f)
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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
class _ConfigAsMapping:
    """Stands in for ``yacs.config.CfgNode`` while unpickling: the stored config is rebuilt as
    plain ordered mappings, so no yacs code runs during the load."""

    def __new__(cls, *args: Any) -> collections.OrderedDict:
        return collections.OrderedDict()


def _to_cfgnode(value: Any) -> Any:
    if isinstance(value, dict):
        return CN({k: _to_cfgnode(v) for k, v in value.items()})
    return value


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """Loads a checkpoint with ``torch.load(weights_only=True)``: tensors, plain containers and
    numbers, and the yacs config of released checkpoints (returned as a CfgNode under "config").
    Anything else (a pickled object that could run code) is refused, and so is a file whose
    checksum (written by atomic_save) does not match; files without one load as before. The
    one reader of checkpoints in the repository (tools included)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_SAVE_MAGIC):
        found = f"it starts with {head!r}" if head else "it is empty"
        raise CheckpointError(f"{path}: not a checkpoint (not a torch.save file: {found})")
    verify_checksum(path)
    try:
        with torch.serialization.safe_globals([(_ConfigAsMapping, "yacs.config.CfgNode")]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: cannot be read (truncated or corrupt?): {e}") from None
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors, plain "
            f"containers and a yacs config, which could run code when loaded ({reason})") from None
    except Exception as e:  # zip/pickle decoding errors of every kind mean the same here
        first_line = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot be read (truncated or corrupt?): "
                              f"{type(e).__name__}: {first_line}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        keys = f" with keys {sorted(map(str, ckpt))[:10]}" if isinstance(ckpt, dict) else ""
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict with the weights under "
                              f"'model', got {type(ckpt).__name__}{keys}")
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = _to_cfgnode(ckpt["config"])
    return ckpt


def _describe(ckpt: dict) -> str:
    config = ckpt.get("config")
    if isinstance(config, dict) and isinstance(config.get("MODEL"), dict):
        return (f" (it was saved by a run of MODEL.NAME {config['MODEL'].get('NAME')}, "
                f"NUM_CLASSES {config['MODEL'].get('NUM_CLASSES')})")
    return ""


# (embedding width, blocks per stage) of the released variants, to name a checkpoint's variant
RELEASED_VARIANTS = {(arch["EMBED_DIM"], tuple(arch["DEPTHS"])): title
                     for title, arch, _ in VARIANTS.values()}
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_WIDTH = "embedding width (MODEL.MGSSAF.EMBED_DIM)"
_CLASSES = "classes (MODEL.NUM_CLASSES)"


def _architecture(weights: dict[str, Any]) -> dict[str, Any]:
    """What the shapes of a state dict say about its network (embedding width, blocks per stage,
    number of classes), each under the phrase that names it in messages."""
    depths: dict[int, int] = {}
    for key in weights:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    arch: dict[str, Any] = {"stages": len(depths)}
    if "patch_embed.norm.weight" in weights:
        arch[_WIDTH] = weights["patch_embed.norm.weight"].shape[0]
    for stage, depth in sorted(depths.items()):
        arch[f"blocks in stage {stage} (layers.{stage})"] = depth
    if "head.weight" in weights:
        arch[_CLASSES] = weights["head.weight"].shape[0]
    return arch


def _variant(arch: dict[str, Any]) -> str | None:
    """The released variant whose width and depths ``arch`` has, if any."""
    depths = tuple(arch[f"blocks in stage {s} (layers.{s})"] for s in range(arch["stages"])
                   if f"blocks in stage {s} (layers.{s})" in arch)
    return RELEASED_VARIANTS.get((arch.get(_WIDTH), depths))


def weight_differences(weights: dict[str, Any], own: dict[str, Any], limit: int = 3) -> list[str]:
    """At most ``limit`` (+1) short phrases saying how the checkpoint's ``weights`` differ from the
    model's state dict ``own``: network dimensions first, else the first differing entries."""
    theirs, ours = _architecture(weights), _architecture(own)
    found = [f"{what}: {theirs.get(what)} in the checkpoint, {ours.get(what)} in this model"
             for what in dict.fromkeys([*ours, *theirs]) if theirs.get(what) != ours.get(what)]
    if found:
        variant, own_variant = _variant(theirs), _variant(ours)
        if variant and variant != own_variant:
            into = f" into an {own_variant} model" if own_variant else ""
            found = found[:limit] + [f"an {variant} checkpoint{into}?"]
        return found[:limit + 1]
    shapes = [f"size mismatch for {k}: {tuple(weights[k].shape)} in the checkpoint, "
              f"{tuple(own[k].shape)} in this model"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    found = shapes[:limit] + ([f"{len(shapes) - limit} more size mismatches"]
                              if len(shapes) > limit else [])
    if missing:
        found.append(f"{len(missing)} of the model's keys missing (first: {missing[0]})")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    return found


def _misfit(path: str, ckpt: dict, own: dict[str, Any]) -> CheckpointError:
    differences = "; ".join(weight_differences(ckpt["model"], own))
    return CheckpointError(f"{path}: its weights do not fit this model{_describe(ckpt)}: "
                           f"{differences}")


def load_weights(model: torch.nn.Module, ckpt: dict, path: str) -> None:
    """Loads ``ckpt["model"]`` into ``model`` strictly; a mismatch is refused with a message
    that says which dimensions (or, failing that, which entries) differ."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError:
        raise _misfit(path, ckpt, model.state_dict()) from None


def load_pretrained(path: str, model: torch.nn.Module, logger: logging.Logger) -> None:
    """Initialises ``model`` from the weights of a checkpoint (optimizer and epoch start fresh).
    A classifier head of another class count is left at its initialisation, for fine-tuning; a
    model without a classifier (``num_classes`` 0) does not load the checkpoint's."""
    ckpt = load_checkpoint_file(path)
    own = model.state_dict()
    weights = dict(ckpt["model"])
    head = [k for k in weights
            if k.startswith("head.") and (k not in own or weights[k].shape != own[k].shape)]
    mismatched = [k for k in own if k in weights and k not in head
                  and weights[k].shape != own[k].shape]
    missing = [k for k in own if k not in weights and k not in head]
    unexpected = [k for k in weights if k not in own and k not in head]
    if mismatched or missing or unexpected:
        ckpt = {**ckpt, "model": {k: v for k, v in weights.items() if k not in head}}
        raise _misfit(path, ckpt, {k: v for k, v in own.items() if k not in head})
    for key in head:
        shape = tuple(weights.pop(key).shape)
        if key in own:
            logger.warning(f"{path}: {key} has shape {shape}, the model {tuple(own[key].shape)}: "
                           "the head starts from its initialisation")
        else:
            logger.info(f"{path}: {key} {shape} not loaded: the model has no classifier")
    model.load_state_dict(weights, strict=False)
    logger.info(f"loaded pretrained weights from {path}")
