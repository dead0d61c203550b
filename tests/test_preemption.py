"""Preemption as launchers and Slurm deliver it, and exact resume at any step, through the real
command line on CPU: a tiny model, loader workers on, augmentation, Mixup/CutMix, drop
path and dropout on; a signal mid-epoch, then the same command again."""
from __future__ import annotations

import os
import re
import signal

import pytest
import torch

import helpers as h
from models.checkpoint_io import load_checkpoint_file

pytestmark = pytest.mark.cli

# 48 training images: 24 steps per epoch with one process, 12 with two (batch 2).
TRAIN_PER_CLASS = 16
OPTS = ("TRAIN.EPOCHS", "2", "DATA.NUM_WORKERS", "2", "DETERMINISTIC", "true",
        "MODEL.DROP_RATE", "0.1")
COMPARED = ("train_loss", "lr", "val_loss", "acc1", "acc5", "num_updates")


@pytest.fixture(scope="module")
def data48(tmp_path_factory) -> str:
    return h.make_imagefolder(str(tmp_path_factory.mktemp("data48")),
                              train_per_class=TRAIN_PER_CLASS)


def argv(data: str, output: str, tag: str) -> list[str]:
    return h.main_args(data, output, tag, *OPTS, batch_size=2)


def uninterrupted(data: str, output: str, prefix: tuple[str, ...]) -> str:
    result = h.run_cli(argv(data, output, "uninterrupted"), prefix=prefix)
    assert result.returncode == 0, result.stdout[-3000:]
    return h.run_dir(output, "uninterrupted")


@pytest.fixture(scope="module")
def one_process_run(data48, tmp_path_factory) -> str:
    return uninterrupted(data48, str(tmp_path_factory.mktemp("one")), ("main.py",))


def check_stopped_mid_epoch(folder: str, signal_name: str, steps: int) -> str:
    """One step checkpoint of epoch 0, named by the marker; returns its path."""
    saved = [n for n in os.listdir(folder) if re.fullmatch(r"ckpt_epoch_0_step_\d+\.pth", n)]
    assert len(saved) == 1, os.listdir(folder)
    step = int(re.search(r"step_(\d+)", saved[0]).group(1))
    assert 3 < step < steps
    found = h.read_marker(folder)
    path = os.path.join(folder, saved[0])
    assert found["checkpoint"] == path and found["signal"] == signal_name
    assert found["epoch"] == "0" and found["step"] == str(step) and found["exit_code"] == "75"
    return path


def check_resumed_exactly(folder: str, reference: str, saved: str, stdout: str) -> None:
    """The rerun starts at the saved step (no finished step is trained again) and ends as the
    uninterrupted run did, bit for bit."""
    step = int(re.search(r"step_(\d+)", saved).group(1))
    assert f"resumed from {saved}: epoch 0, step {step}," in stdout
    rerun = stdout[stdout.index(f"resumed from {saved}"):]  # a log file holds both runs
    assert h.step_lines(rerun)[0] == (0, step)
    assert not os.path.exists(os.path.join(folder, "PREEMPTED"))
    expected, got = h.read_metrics(reference), h.read_metrics(folder)
    assert sorted(got) == [0, 1]
    for epoch in got:
        for key in COMPARED:
            assert got[epoch][key] == expected[epoch][key], (epoch, key)
    final, ref = (load_checkpoint_file(os.path.join(f, "ckpt_epoch_1.pth"))["model"]
                  for f in (folder, reference))
    assert all(torch.equal(final[k], ref[k]) for k in ref)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_to_the_process_group_saves_a_step_and_the_rerun_equals_an_uninterrupted_run(
        sig, one_process_run, data48, tmp_path):
    # Slurm signals the job step's process group, a terminal's Ctrl-C the foreground group:
    # the loader workers get the signal too.
    args = argv(data48, str(tmp_path), "preempted")
    folder = h.run_dir(str(tmp_path), "preempted")
    log = str(tmp_path / "preempted.log")
    assert h.interrupt(args, folder, log, ("main.py",), sig, to_group=True) == 75, \
        h.read(log)[-3000:]
    output = h.read(log)
    assert f"preempted: {sig.name} received: stopped at epoch 0 step" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    saved = check_stopped_mid_epoch(folder, sig.name, 24)

    resumed = h.run_cli(args)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    check_resumed_exactly(folder, one_process_run, saved, resumed.stdout)


@pytest.mark.slow
def test_sigterm_to_torchrun_with_workers_saves_a_step_and_the_rerun_equals_an_uninterrupted_run(
        data48, tmp_path):
    reference = uninterrupted(data48, str(tmp_path / "reference"), h.torchrun())
    args = argv(data48, str(tmp_path), "preempted")
    folder = h.run_dir(str(tmp_path), "preempted")
    log = str(tmp_path / "torchrun.log")
    # torchrun forwards SIGTERM to each rank's process group, waits for the ranks, then exits 1
    # (not 75): the marker is what tells a requeue script that the run was preempted.
    assert h.interrupt(args, folder, log, h.torchrun(), signal.SIGTERM, to_group=False) != 0
    saved = check_stopped_mid_epoch(folder, "SIGTERM", 12)
    step = h.read_marker(folder)["step"]
    for rank in (0, 1):
        assert (f"preempted: SIGTERM received: stopped at epoch 0 step {step}/12"
                in h.read(os.path.join(folder, f"log_rank{rank}.txt")))
    assert "killed by signal" not in h.read(log)

    resumed = h.run_cli(args, prefix=h.torchrun())
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    check_resumed_exactly(folder, reference, saved, h.read(os.path.join(folder, "log_rank0.txt")))


# main.py with loader workers that do not guard against the stop signals (torch's own SIGTERM
# handler: they die of it), as under a start method that does not inherit the signal mask.
UNGUARDED_WORKERS = """
import sys, torch.utils.data, data.build, main
data.build.init_worker = max  # a worker_init_fn that does nothing (and pickles)
data.build.Loader.__iter__ = torch.utils.data.DataLoader.__iter__
sys.exit(main.main(sys.argv[1:]))
"""


def test_a_worker_that_dies_of_the_signal_is_part_of_the_preemption(data48, tmp_path):
    # Optimizer steps after loader steps 16 and 24: signalled at step 17, the run needs batches
    # that the dead workers never made before it can stop at an optimizer step.
    args = [*argv(data48, str(tmp_path), "unguarded"), "TRAIN.ACCUMULATION_STEPS", "16"]
    folder = h.run_dir(str(tmp_path), "unguarded")
    log = str(tmp_path / "unguarded.log")
    code = h.interrupt(args, folder, log, ("-c", UNGUARDED_WORKERS), signal.SIGTERM,
                       to_group=True, step=17)
    output = h.read(log)
    assert code == 75, output[-3000:]
    # torch's worker check, or the pipe of a worker killed while it handed a batch over
    assert re.search(r"(RuntimeError|Connection\w*Error|EOFError) while stopping on SIGTERM",
                     output), output[-3000:]
    assert "stopped at epoch 0 step 16/24" in output  # the state of the last optimizer step
    assert h.read_marker(folder)["checkpoint"] == os.path.join(folder, "ckpt_epoch_0_step_16.pth")


SECOND_SIGNAL = """
import os, signal, sys, time
from engine.preemption import Preemption
preemption = Preemption()
preemption.install()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGINT)  # the same request delivered twice: still running
assert preemption.signal_name == "SIGINT"
time.sleep(Preemption.REPEAT_WINDOW_S + 0.2)
print("still running", flush=True)
os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: ends at once
time.sleep(30)
"""


def test_a_second_ctrl_c_ends_at_once_but_a_repeat_of_the_first_does_not():
    result = h.run_cli([], prefix=("-c", SECOND_SIGNAL), timeout=60)
    assert result.returncode == -signal.SIGINT, result.stdout[-3000:]
    assert "still running" in result.stdout and "Traceback" not in result.stdout


def test_resume_with_another_batch_size_recomputes_the_position(one_process_run, data48,
                                                                tmp_path):
    # A step checkpoint of the batch-2 run after 5 steps (10 samples), resumed with batch 4.
    folder = h.run_dir(str(tmp_path), "rebatched")
    os.makedirs(folder)
    ckpt = load_checkpoint_file(os.path.join(one_process_run, "ckpt_epoch_0.pth"))
    ckpt.update(epoch_step=5, num_updates=5, train_loss=(10.0, 10))
    torch.save(ckpt, os.path.join(folder, "ckpt_epoch_0_step_5.pth"))
    # this run's schedule and weight decay differ too
    result = h.run_cli(h.main_args(data48, str(tmp_path), "rebatched", *OPTS,
                                   "DATA.NUM_WORKERS", "0", "TRAIN.LR_SCHEDULER.NAME", "linear",
                                   "TRAIN.WEIGHT_DECAY", "0.1", batch_size=4))
    assert result.returncode == 0, result.stdout[-3000:]
    assert ("the checkpoint's run had DATA.BATCH_SIZE 2 x 1 process(es) x "
            "TRAIN.ACCUMULATION_STEPS 1, this one 4 x 1 x 1: epoch 0 continues after 8 of the 10 "
            "samples seen (2 to be seen again), the LR schedule continues at optimizer step 2"
            in result.stdout)
    assert "Train: [0/2][2/12]" in result.stdout and "Train: [0/2][1/12]" not in result.stdout
    rows = h.read_metrics(folder)
    assert [row["num_updates"] for row in rows.values()] == [12, 24]
    # The LR follows this run's schedule (linear over 24 steps, the LR scaled for batch 4), not
    # the saved one (cosine over 48 steps of batch 2): half its peak at the middle, its minimum
    # at the end; the weight decay is this run's too.
    assert ("the checkpoint's LR schedule differs from this run's config (base_values "
            "[0.0007813, 0.0007813] -> [0.001563, 0.001563], t_initial 48 -> 24, power - -> 1, "
            in result.stdout)  # power: linear (a polynomial of power 1), not cosine
    assert ("the checkpoint's optimizer settings differ from this run's config (weight_decay "
            "0.05 -> 0.1): this run's apply, with the checkpoint's moments") in result.stdout
    saved = load_checkpoint_file(os.path.join(folder, "ckpt_epoch_1.pth"))["optimizer"]
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.1, 0.0]
    assert rows[0]["lr"] == pytest.approx(0.0015625 / 2, rel=1e-3)
    assert rows[1]["lr"] == pytest.approx(7.8125e-09)


# main.py where rank 1 cannot read the checkpoint files (an output folder not shared by its node)
RANK_1_SEES_NO_CHECKPOINTS = """
import os, sys, main, engine.checkpoint as checkpoint
def load_checkpoint_file(path):
    raise checkpoint.CheckpointError(f"checkpoint not found: {path}")
if os.environ["RANK"] == "1":
    checkpoint.load_checkpoint_file = load_checkpoint_file
sys.exit(main.main(sys.argv[1:]))
"""


def test_ranks_resume_from_the_checkpoint_rank_0_chose_or_all_stop_naming_the_rank(
        one_process_run, data48, tmp_path):
    folder = h.copy_run(one_process_run, str(tmp_path), "unshared")
    args = h.main_args(data48, str(tmp_path), "unshared", *OPTS, flags=("--eval",), batch_size=2)
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(h.free_port()))
    logs = [str(tmp_path / f"rank{r}.log") for r in (0, 1)]
    ranks = [h.start(args, logs[r], ("-c", RANK_1_SEES_NO_CHECKPOINTS),
                     env=dict(RANK=str(r), LOCAL_RANK=str(r), **env)) for r in (0, 1)]
    for rank in ranks:
        rank.wait(timeout=120)
    outputs = [h.read(log) for log in logs]
    newest = os.path.join(folder, "ckpt_epoch_1.pth")
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 1, output[-3000:]
        assert (f"auto-resume: rank 0 chose {newest}, but rank 1 cannot load it (checkpoint not "
                f"found: {newest})" in output), output[-3000:]


def children_with_rank(parent: int, rank: int) -> list[int]:
    """The direct child processes of ``parent`` started as rank ``rank`` (RANK in their
    environment): torchrun's workers, not their loader workers."""
    found = []
    for pid in h.children(parent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            found.append(pid)
    return found


@pytest.mark.slow
def test_kill_9_of_one_rank_under_torchrun_is_a_failure_not_a_preemption(data48, tmp_path):
    # torchrun SIGTERMs the surviving rank itself: that is no preemption, and a requeue script
    # that reads PREEMPTED must not requeue a crashing job.
    args = argv(data48, str(tmp_path), "crashed")
    folder = h.run_dir(str(tmp_path), "crashed")
    log = str(tmp_path / "torchrun.log")
    process = h.start(args, log, h.torchrun(), new_session=True)
    rank0 = os.path.join(folder, "log_rank0.txt")
    left: list[int] = []
    try:
        h.wait_for_line(rank0, "Train: [0/2][3/", process, log=log)
        rank1 = children_with_rank(process.pid, 1)
        assert len(rank1) == 1, rank1
        left = h.descendants(rank1[0])  # with its fork server and loader workers
        os.kill(rank1[0], signal.SIGKILL)
        code = process.wait(timeout=120)
        assert not h.still_running_after(left, 30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in h.running(left):
            os.kill(pid, signal.SIGKILL)
    assert code != 0, h.read(log)[-3000:]
    assert not os.path.exists(os.path.join(folder, "PREEMPTED")), h.read(log)[-3000:]
    output = h.read(rank0)
    assert "rank(s) 1 died or hung" in output and "preempted:" not in output, output[-3000:]
    assert "a failure, not a preemption (no PREEMPTED marker)" in output
