"""Fault injection: interrupt training runs at random points and check each rerun.

    python tests/fault_injection.py --cases 16 --seed 20 [--launchers plain,torchrun] [--keep]

Each case starts the tiny CPU training run of tests/test_preemption.py (48 images, batch 2,
2 epochs, loader workers, augmentation, Mixup/CutMix, drop path, dropout), plain or under
torchrun with 2 processes, and interrupts it with SIGTERM, SIGINT, SIGUSR1 or kill -9 at a
point drawn from a fixed seed: during an optimizer step, during validation, or during the saves
at an epoch's end (each write of a checkpoint is slowed by 0.3 s, so the signal lands inside
it). Then the same command runs again to the end, and the case holds when

- a signal left a PREEMPTED marker naming a checkpoint (or the run had finished), a kill -9 no
  marker, and the rerun resumed from the saved step: the marker's checkpoint, or after kill -9
  the newest loadable one (none: from scratch), its first step line is that step;
- its metrics.jsonl equals an uninterrupted run's (same launcher), bit for bit;
- ckpt_best.pth exists and holds the uninterrupted run's best epoch and accuracy;
- no temporary file of a save and no RUNNING lock is left behind.

Prints one line per case and "N tried / N held"; exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import helpers as h  # noqa: E402
from engine.checkpoint import list_checkpoints  # noqa: E402
from models.checkpoint_io import CheckpointError, load_checkpoint_file  # noqa: E402

EPOCHS = 2
OPTS = ("TRAIN.EPOCHS", str(EPOCHS), "DATA.NUM_WORKERS", "2", "DETERMINISTIC", "true",
        "MODEL.DROP_RATE", "0.1")
COMPARED = ("train_loss", "lr", "val_loss", "acc1", "acc5", "num_updates")
STEPS = {"plain": 24, "torchrun": 12}  # loader steps per epoch (48 images, batch 2 per rank)
VAL_BATCHES = {"plain": 5, "torchrun": 3}  # 9 validation images, batch 2 per rank
ACTIONS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGKILL")
PHASES = ("step", "validation", "save")

# main.py with every checkpoint write slowed down, so that a signal can land inside a save.
WRAPPER = f"""
import sys, time
sys.path.insert(0, {os.path.dirname(HERE)!r})
import torch, utils, main
save = torch.save
def slow_save(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(0.3)
utils.torch.save = slow_save
if __name__ == "__main__":  # the loader workers' fork server imports this file too
    sys.exit(main.main(sys.argv[1:]))
"""


@dataclasses.dataclass
class Case:
    number: int
    launcher: str      # plain | torchrun
    action: str        # SIGTERM | SIGINT | SIGUSR1 | SIGKILL
    phase: str         # step | validation | save
    epoch: int
    step: int          # loader step (phase step) or validation batch (phase validation)
    to_group: bool     # plain: signal the process group (Slurm, Ctrl-C) or the process alone
    delay: float       # seconds after the trigger line

    def __str__(self) -> str:
        where = {"step": f"step {self.step}", "validation": f"validation batch {self.step}",
                 "save": f"saves +{self.delay:.2f}s"}[self.phase]
        target = "group" if self.to_group else "ranks" if (
            self.launcher == "torchrun" and self.action == "SIGUSR1") else "process"
        return (f"#{self.number:02d} {self.launcher:8s} {self.action:7s} -> {target:7s} "
                f"epoch {self.epoch} {where}")


def draw_cases(count: int, seed: int, launchers: list[str]) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for number in range(count):
        launcher = launchers[1] if len(launchers) > 1 and number % 3 == 2 else launchers[0]
        phase = rng.choice(PHASES)
        action = rng.choice(ACTIONS)
        epoch = rng.randrange(EPOCHS)
        step = (rng.randrange(1, STEPS[launcher] - 1) if phase == "step" else
                rng.randrange(VAL_BATCHES[launcher]))
        to_group = rng.random() < 0.5
        delay = round(rng.uniform(0.0, 0.7), 2)
        # kill -9 takes every process (a lost node); torchrun gets the signal itself (SIGUSR1,
        # which it does not forward: its ranks)
        to_group = action == "SIGKILL" or (launcher == "plain" and to_group)
        cases.append(Case(number, launcher, action, phase, epoch, step, to_group, delay))
    return cases


def prefix(launcher: str, wrapper: str) -> tuple[str, ...]:
    return (wrapper,) if launcher == "plain" else h.torchrun(2, wrapper)


def trigger(case: Case) -> str:
    """The line of log_rank0.txt after which the fault is injected."""
    steps = STEPS[case.launcher]
    if case.phase == "step":
        return f"Train: [{case.epoch}/{EPOCHS}][{case.step}/{steps}]"
    if case.phase == "validation":
        return f"EPOCH {case.epoch} training takes"  # then validation batch case.step
    return "Max accuracy"  # the saves of the epoch follow (the count says which epoch)


def deliver(case: Case, process: subprocess.Popen) -> None:
    sig = getattr(signal, case.action)
    if case.action == "SIGKILL":
        h.kill_tree(process.pid)  # the node is gone: every process at once
    elif case.launcher == "torchrun" and case.action == "SIGUSR1":
        for pid in h.children(process.pid):  # torchrun does not forward SIGUSR1: signal the ranks
            os.kill(pid, sig)
    elif case.launcher == "plain" and case.to_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)


def interrupt(case: Case, argv: list[str], folder: str, log: str, wrapper: str) -> int | None:
    """Runs the case's first run and injects its fault; the exit code (None: it finished before
    the trigger was reached)."""
    process = h.start(argv, log, prefix(case.launcher, wrapper), new_session=True)
    rank0 = os.path.join(folder, "log_rank0.txt")
    line = trigger(case)
    deadline = time.time() + 600
    try:
        while True:
            text = h.read(rank0, "")
            if case.phase == "save":
                hit = text.count(line) > case.epoch
            elif case.phase == "validation":
                at = text.find(line)
                hit = at >= 0 and f"Test: [{case.step}/" in text[at:]
            else:
                hit = line in text
            if hit:
                break
            if process.poll() is not None:
                return None
            if time.time() > deadline:
                raise TimeoutError(f"no '{line}' in {rank0}")
            time.sleep(0.01)
        if case.phase == "save":
            time.sleep(case.delay)
        deliver(case, process)
        return process.wait(timeout=300)
    finally:
        if process.poll() is None:
            h.kill_tree(process.pid)
            process.wait()


def newest_loadable(folder: str) -> str | None:
    for _, _, path in reversed(list_checkpoints(folder)):
        try:
            load_checkpoint_file(path)
            return path
        except CheckpointError:
            continue
    return None


def expected_start(path: str | None) -> tuple[int, int]:
    """(epoch, loader step) where a run resuming from ``path`` starts."""
    if path is None:
        return 0, 0
    ckpt = load_checkpoint_file(path)
    if ckpt.get("epoch_step") is None:
        return ckpt["epoch"] + 1, 0
    return ckpt["epoch"], ckpt["epoch_step"]


def run_case(case: Case, data: str, work: str, wrapper: str, references: dict[str, str]
             ) -> list[str]:
    """Runs one case; returns what went wrong (empty: it held)."""
    problems = []
    output = os.path.join(work, f"case{case.number:02d}")
    argv = h.main_args(data, output, "run", *OPTS, batch_size=2)
    folder = h.run_dir(output, "run")
    os.makedirs(output, exist_ok=True)
    code = interrupt(case, argv, folder, os.path.join(output, "first.log"), wrapper)
    found = h.read_marker(folder)
    completed = len(h.read_metrics(folder)) == EPOCHS if os.path.exists(
        os.path.join(folder, "metrics.jsonl")) else False
    if case.action == "SIGKILL":
        if found is not None and code is not None:
            problems.append("kill -9 left a PREEMPTED marker")
        resume_from = newest_loadable(folder)
    elif found is None:
        if not completed:
            problems.append(f"signal {case.action}: no PREEMPTED marker (exit {code})")
        resume_from = newest_loadable(folder)
    else:
        resume_from = found["checkpoint"]
        if case.launcher == "plain" and code != 75:
            problems.append(f"exit code {code} with a PREEMPTED marker, expected 75")
    if resume_from is not None and os.path.exists(os.path.join(folder, "metrics.jsonl")) \
            and len(h.read_metrics(folder)) == EPOCHS and expected_start(resume_from)[0] >= EPOCHS:
        start = (EPOCHS, 0)  # nothing left to train
    else:
        start = expected_start(resume_from)

    rerun = h.run_cli(argv, prefix=prefix(case.launcher, wrapper), timeout=600)
    if rerun.returncode != 0:
        problems.append(f"rerun exit {rerun.returncode}: {rerun.stdout[-800:]}")
        return problems
    if resume_from is not None and f"resumed from {resume_from}: epoch " not in rerun.stdout:
        problems.append(f"rerun did not resume from {resume_from}")
    if resume_from is None and "training from scratch" not in rerun.stdout:
        problems.append("rerun did not start from scratch although no checkpoint was saved")
    steps = h.step_lines(rerun.stdout)
    if start[0] < EPOCHS and (not steps or steps[0] != start):
        problems.append(f"rerun's first step {steps[:1]}, expected {start}")
    if start[0] >= EPOCHS and steps:
        problems.append(f"rerun trained again from {steps[0]} after a finished run")

    expected, got = h.read_metrics(references[case.launcher]), h.read_metrics(folder)
    if sorted(got) != list(range(EPOCHS)):
        problems.append(f"metrics for epochs {sorted(got)}")
    for epoch in got:
        for key in COMPARED:
            if got[epoch].get(key) != expected.get(epoch, {}).get(key):
                problems.append(f"epoch {epoch} {key}: {got[epoch].get(key)} != "
                                f"{expected.get(epoch, {}).get(key)}")
    best_path = os.path.join(folder, "ckpt_best.pth")
    if not os.path.exists(best_path):
        problems.append("no ckpt_best.pth")
    else:
        best = load_checkpoint_file(best_path)
        ref = load_checkpoint_file(os.path.join(references[case.launcher], "ckpt_best.pth"))
        if (best["epoch"], best["max_accuracy"]) != (ref["epoch"], ref["max_accuracy"]):
            problems.append(f"ckpt_best.pth of epoch {best['epoch']} ({best['max_accuracy']}), "
                            f"expected epoch {ref['epoch']} ({ref['max_accuracy']})")
    left = [n for n in os.listdir(folder) if n.endswith(".tmp") or n == "RUNNING"]
    if left:
        problems.append(f"left behind: {left}")
    return problems


def reference(launcher: str, data: str, work: str, wrapper: str) -> str:
    output = os.path.join(work, f"reference_{launcher}")
    result = h.run_cli(h.main_args(data, output, "run", *OPTS, batch_size=2),
                       prefix=prefix(launcher, wrapper), timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the uninterrupted {launcher} run failed:\n{result.stdout[-3000:]}")
    return h.run_dir(output, "run")


def run(cases: list[Case], work: str, log=print) -> tuple[int, int, list[str]]:
    """Runs ``cases`` in ``work``; returns (tried, held, failure lines)."""
    data = h.make_imagefolder(os.path.join(work, "data48"), train_per_class=16)
    wrapper = os.path.join(work, "train_slow_saves.py")
    with open(wrapper, "w", encoding="utf-8") as f:
        f.write(WRAPPER)
    references = {launcher: reference(launcher, data, work, wrapper)
                  for launcher in sorted({c.launcher for c in cases})}
    held, failures = 0, []
    for case in cases:
        began = time.time()
        problems = run_case(case, data, work, wrapper, references)
        held += not problems
        status = "held" if not problems else "FAILED: " + "; ".join(problems)
        log(f"{case}  {time.time() - began:5.1f}s  {status}", flush=True)
        if problems:
            failures.append(f"{case}: {'; '.join(problems)}")
    return len(cases), held, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=16, help="number of interruptions (N)")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--launchers", default="plain,torchrun",
                        help="comma-separated: plain, torchrun (every third case)")
    parser.add_argument("--workdir", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    launchers = args.launchers.split(",")
    cases = draw_cases(args.cases, args.seed, launchers)
    work = args.workdir or tempfile.mkdtemp(prefix="fault_injection_")
    os.makedirs(work, exist_ok=True)
    began = time.time()
    try:
        tried, held, failures = run(cases, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{tried} tried / {held} held (seed {args.seed}, {time.time() - began:.0f} s)")
    for line in failures:
        print("FAILED", line)
    return 0 if held == tried else 1


if __name__ == "__main__":
    sys.exit(main())
