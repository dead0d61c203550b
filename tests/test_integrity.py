"""Checkpoint integrity and the run folder, through the real command line on CPU where it
reaches, directly where it does not: one safe reader for every checkpoint, checksums, best and
epoch checkpoints after a crash, pruning, disk full, --resume, nothing written by a run that
fails its checks, the run folder's lock."""
from __future__ import annotations

import ast
import glob
import logging
import os
import signal
import socket
import time

import pytest
import torch

import helpers as h
import utils
from models.checkpoint_io import CheckpointError, load_checkpoint_file, verify_checksum
from utils import atomic_save


# ------------------------------------------------------------------------------------------------
# Every checkpoint read goes through models.checkpoint_io.load_checkpoint_file
# ------------------------------------------------------------------------------------------------
def _loads_outside_the_safe_loader() -> list[str]:
    """``file:line`` of every torch.load / pickle load call in the repository's own code (tests
    excepted) other than the one in models.checkpoint_io.load_checkpoint_file."""
    found = []
    for path in sorted(glob.glob(os.path.join(h.ROOT, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, h.ROOT)
        if rel.startswith("tests" + os.sep):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), rel)
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if (rel == os.path.join("models", "checkpoint_io.py")
                    and isinstance(node, ast.FunctionDef)
                    and node.name == "load_checkpoint_file"):
                allowed |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if ((node.func.attr == "load" and owner in ("torch", "pickle", "torch.jit"))
                        or (node.func.attr == "loads" and owner == "pickle")):
                    if node.lineno not in allowed:
                        found.append(f"{rel}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_checkpoint_is_read_outside_the_safe_loader():
    assert _loads_outside_the_safe_loader() == []


# Every tool that takes a checkpoint, with a command line that reads EVIL; a tool with such a
# flag that is missing here fails test_every_tool_with_a_checkpoint_flag_is_fed_a_malicious_one.
TOOLS_READING_CHECKPOINTS = {
    "tools/seg_overlay.py": ["--cfg", h.SEG_DEMO_CFG, "--checkpoint", "EVIL", "--digits", "0",
                             "--out", "OUT"],
    "tools/predict.py": ["--cfg", h.CFG, "--checkpoint", "EVIL", "DATA", "--opts", *h.TINY_MODEL],
    "tools/export.py": ["--cfg", h.CFG, "--checkpoint", "EVIL", "--output", "OUT", "--no-onnx",
                        "--opts", *h.TINY_MODEL],
}


def test_every_tool_with_a_checkpoint_flag_is_listed():
    flags = ('"--checkpoint"', '"--resume"', '"--pretrained"', '"--weights"')
    taking = set()
    for path in glob.glob(os.path.join(h.ROOT, "tools", "*.py")):
        with open(path, encoding="utf-8") as f:
            if any(flag in f.read() for flag in flags):
                taking.add(os.path.relpath(path, h.ROOT))
    assert taking == set(TOOLS_READING_CHECKPOINTS)


# The training entry point's other checkpoint flag (--resume: test_robustness).
ENTRY_POINTS = {"main.py --pretrained": ["--cfg", h.CFG, "--data-path", "DATA", "--output", "OUT",
                                         "--batch-size", "4",
                                         "--pretrained", "EVIL", "--opts", *h.TINY]}


@pytest.mark.cli
@pytest.mark.parametrize("tool", sorted(TOOLS_READING_CHECKPOINTS) + sorted(ENTRY_POINTS))
def test_every_tool_with_a_checkpoint_flag_is_fed_a_malicious_one(tool, data, tmp_path):
    marker = str(tmp_path / "pwned")
    evil = h.evil_checkpoint(str(tmp_path / "evil.pth"), marker)
    fill = {"EVIL": evil, "OUT": str(tmp_path / "out"), "DATA": data}
    argv = [fill.get(a, a) for a in {**TOOLS_READING_CHECKPOINTS, **ENTRY_POINTS}[tool]]
    tool = tool.split()[0]
    result = h.run_cli(argv, prefix=(tool,))
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"{evil}: refused to load" in result.stdout and "Traceback" not in result.stdout
    assert not os.path.exists(marker)


def test_the_timm_path_refuses_a_malicious_checkpoint(tmp_path):
    import timm

    import models  # noqa: F401  (registers the timm names)
    marker = str(tmp_path / "pwned")
    evil = h.evil_checkpoint(str(tmp_path / "evil.pth"), marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        timm.create_model("mg_ssaf_t", pretrained=True, num_classes=3,
                          pretrained_cfg_overlay=dict(file=evil))
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------------------------------
# Checksums, the best checkpoint after a crash, pruning, leftovers of interrupted saves
# ------------------------------------------------------------------------------------------------
def test_a_checkpoint_carries_a_checksum_and_one_without_loads_as_before(tmp_path):
    ours, plain = str(tmp_path / "ours.pth"), str(tmp_path / "plain.pth")
    atomic_save({"model": {"w": torch.arange(4.0)}}, ours)
    torch.save({"model": {"w": torch.arange(4.0)}}, plain)  # released / older checkpoints
    assert verify_checksum(ours) is True and verify_checksum(plain) is False
    for path in (ours, plain):
        assert torch.equal(load_checkpoint_file(path)["model"]["w"], torch.arange(4.0))
    with open(ours, "r+b") as f:  # one flipped byte of a tensor
        data = f.read()
        f.seek(data.index(torch.arange(4.0).numpy().tobytes()) + 5)
        f.write(b"\x7f")
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint_file(ours)


@pytest.mark.cli
def test_a_corrupt_checkpoint_that_parses_is_skipped_by_auto_resume_and_kept(reference, data,
                                                                            tmp_path):
    folder = h.copy_run(reference, str(tmp_path), "corrupt")
    newest = os.path.join(folder, "ckpt_epoch_3.pth")
    with open(newest, "r+b") as f:  # 4 KB of 0xFF in the middle: still a loadable zip
        f.seek(os.path.getsize(newest) // 2)
        f.write(b"\xff" * 4096)
    with open(newest, "rb") as f:
        corrupt = f.read()
    result = h.run_cli(h.main_args(data, str(tmp_path), "corrupt", flags=("--eval",)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"auto-resume skips {newest}: corrupt: its SHA-256 checksum" in result.stdout
    assert f"evaluating the weights of {os.path.join(folder, 'ckpt_epoch_2.pth')}" in result.stdout
    with open(newest, "rb") as f:
        assert f.read() == corrupt


# main.py killed (SIGKILL, no handler runs) when it starts to write ckpt_best.pth at epoch EPOCH.
KILL_IN_BEST_SAVE = """
import os, signal, sys, main, engine.checkpoint as checkpoint
save = checkpoint.atomic_save
def atomic_save(obj, path):
    if path.endswith("ckpt_best.pth") and obj["epoch"] == int(os.environ["KILL_EPOCH"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, path)
checkpoint.atomic_save = atomic_save
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.cli
def test_kill_9_while_the_best_checkpoint_is_written_does_not_lose_it(reference, data, tmp_path):
    best = load_checkpoint_file(os.path.join(reference, "ckpt_best.pth"))
    argv = h.main_args(data, str(tmp_path), "best", *h.REFERENCE_OPTS)
    folder = h.run_dir(str(tmp_path), "best")
    killed = h.run_cli(argv, prefix=("-c", KILL_IN_BEST_SAVE),
                       env={**h.child_env(), "KILL_EPOCH": str(best["epoch"])})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    resumed = h.run_cli(argv)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    saved = load_checkpoint_file(os.path.join(folder, "ckpt_best.pth"))
    assert saved["epoch"] == best["epoch"] and saved["max_accuracy"] == best["max_accuracy"]
    assert all(torch.equal(saved["model"][k], best["model"][k]) for k in best["model"])


@pytest.mark.cli
def test_training_keeps_unloadable_checkpoints_and_removes_leftover_temp_files(reference, data,
                                                                              tmp_path):
    folder = h.copy_run(reference, str(tmp_path), "prune")
    marker = str(tmp_path / "pwned")
    refused = h.evil_checkpoint(os.path.join(folder, "ckpt_epoch_3_step_1.pth"), marker)
    corrupt = os.path.join(folder, "ckpt_epoch_2.pth")  # beyond KEEP_CHECKPOINTS 2 after epoch 4
    with open(corrupt, "r+b") as f:
        f.seek(os.path.getsize(corrupt) // 2)
        f.write(b"\xff" * 64)
    leftovers = [os.path.join(folder, n) for n in (".ckpt_epoch_4.pth.k1l2m3.tmp",
                                                    ".ckpt_best.pth.x9y8z7.tmp", "PREEMPTED.tmp")]
    for path in leftovers:
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
    result = h.run_cli(h.main_args(data, str(tmp_path), "prune", *h.REFERENCE_OPTS,
                                   "TRAIN.EPOCHS", "5"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert os.path.exists(os.path.join(folder, "ckpt_epoch_4.pth"))
    for path in (refused, corrupt):
        assert os.path.exists(path)
        assert f"not pruned, as it does not load: {path}" in result.stdout
    assert not os.path.exists(marker)
    for path in leftovers:
        assert not os.path.exists(path)
        assert f"removed {path}, left by an interrupted save" in result.stdout


# ------------------------------------------------------------------------------------------------
# Disk full while saving
# ------------------------------------------------------------------------------------------------
# main.py on a disk that fills up while ckpt_epoch_1.pth is written (writes fail with ENOSPC
# after its first 64 KB).
DISK_FULL_AT_EPOCH_1 = """
import errno, io, os, sys, main, utils
fdopen = os.fdopen
class Full(io.FileIO):
    def write(self, data):
        if self.tell() + len(data) > 65536:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)
def full_fdopen(fd, mode="r", *args, **kwargs):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith(".ckpt_epoch_1.pth.") and "b" in mode:
        return io.BufferedRandom(Full(fd, "r+"))
    return fdopen(fd, mode, *args, **kwargs)
utils.os.fdopen = full_fdopen
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.cli
def test_a_full_disk_while_saving_ends_the_run_with_one_line_and_keeps_what_was_saved(
        data, tmp_path):
    argv = h.main_args(data, str(tmp_path), "full", "TRAIN.EPOCHS", "3", *h.NO_AUG)
    folder = h.run_dir(str(tmp_path), "full")
    result = h.run_cli(argv, prefix=("-c", DISK_FULL_AT_EPOCH_1))
    assert result.returncode == 1, result.stdout[-3000:]
    path = os.path.join(folder, "ckpt_epoch_1.pth")
    errors = [line for line in result.stdout.splitlines() if "ERROR" in line]
    message = (f"cannot save {path}: No space left on device (errno 28); the files saved before "
               "are intact")
    assert len(errors) == 1 and message in errors[0], result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    assert load_checkpoint_file(os.path.join(folder, "ckpt_epoch_0.pth"))["epoch"] == 0
    assert sorted(n for n in os.listdir(folder) if "ckpt" in n) == ["ckpt_best.pth",
                                                                   "ckpt_epoch_0.pth"]


# ------------------------------------------------------------------------------------------------
# --resume, nothing written by a failed run, the lock
# ------------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_a_run_resuming_from_a_file_that_is_not_a_checkpoint_writes_nothing_into_the_run_folder(
        reference, data, tmp_path):
    # (a run that fails the MODEL.NUM_CLASSES check: test_robustness's bad input num_classes)
    folder = h.copy_run(reference, str(tmp_path), "victim")
    before = h.folder_bytes(folder)
    notes = tmp_path / "a.jpg"
    notes.write_text("an image, not a checkpoint")
    result = h.run_cli(h.main_args(data, str(tmp_path), "victim", *h.REFERENCE_OPTS,
                                   "TRAIN.EPOCHS", "5", flags=("--resume", str(notes))))
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"{notes}: not a checkpoint" in result.stdout, result.stdout[-3000:]
    assert h.folder_bytes(folder) == before


@pytest.mark.cli
def test_a_second_run_on_a_live_runs_folder_is_refused_and_a_rerun_after_kill_9_takes_over(
        data, tmp_path):
    argv = h.main_args(data, str(tmp_path), "locked", "TRAIN.EPOCHS", "1000", *h.NO_AUG)
    folder = h.run_dir(str(tmp_path), "locked")
    first = h.start(argv, str(tmp_path / "first.log"))
    try:
        log = os.path.join(folder, "log_rank0.txt")
        h.wait_for_line(log, "Train: [0/1000]", first)
        with open(os.path.join(folder, "RUNNING"), encoding="utf-8") as f:
            assert f.read().startswith(f"host={socket.gethostname()}\npid={first.pid}\n")
        before = h.read(log)
        second = h.run_cli(argv)
        assert second.returncode == 1, second.stdout[-3000:]
        assert (f"{folder} is in use by another training run: host {socket.gethostname()}, pid "
                f"{first.pid}" in second.stdout), second.stdout[-3000:]
        assert h.read(log).startswith(before) and "in use by another" not in h.read(log)
        h.wait_for(lambda: glob.glob(os.path.join(folder, "ckpt_epoch_*.pth")), first)
    finally:
        first.kill()  # SIGKILL: the lock stays behind
        first.wait()
    third = h.run_cli([*argv, "TRAIN.EPOCHS", "2"])  # resumes, and at most one epoch to go
    assert third.returncode == 0, third.stdout[-3000:]
    assert (f"taking over the lock {os.path.join(folder, 'RUNNING')} of host "
            f"{socket.gethostname()} pid {first.pid} (process {first.pid} is gone)"
            in third.stdout)
    assert "resumed from " in third.stdout
    assert not os.path.exists(os.path.join(folder, "RUNNING"))  # released at the end


def test_the_lock_is_a_lease_refreshed_while_held_and_taken_over_once_stale(tmp_path,
                                                                            monkeypatch):
    path = tmp_path / "RUNNING"
    path.write_text("host=node-17\npid=4242\nstarted=yesterday\n")
    with pytest.raises(utils.RunError, match=r"in use by another training run: host node-17, "
                                             r"pid 4242 \(its lock .* was refreshed 0 s ago"):
        utils.RunLock(str(tmp_path)).acquire()
    old = time.time() - utils.LOCK_STALE_S - 5  # the holder (another node) stopped refreshing
    os.utime(path, (old, old))
    monkeypatch.setattr(utils, "LOCK_REFRESH_S", 0.1)
    lock = utils.RunLock(str(tmp_path))
    lock.acquire(logging.getLogger("test"))
    try:
        assert path.read_text().startswith(f"host={socket.gethostname()}\npid={os.getpid()}\n")
        os.utime(path, (old, old))
        deadline = time.time() + 10
        while os.stat(path).st_mtime == old:  # the lease thread refreshes it
            assert time.time() < deadline, "the lease was not refreshed"
            time.sleep(0.05)
    finally:
        lock.release()
    assert not path.exists()
