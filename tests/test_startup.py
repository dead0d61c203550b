"""The first moments of a run, through the real command line: a stop signal during the imports
stops it as preempted, and on CPU the thread count suits a busy machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import helpers as h

pytestmark = pytest.mark.cli



def importing_torch(pid: int) -> bool:
    """Whether the process has mapped libtorch: it is importing torch (seconds before a run's own
    code starts)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("script, cfg", [("main.py", h.CFG), ("main_seg.py", h.SEG_DEMO_CFG)],
                         ids=["main", "main_seg"])
def test_a_signal_while_importing_stops_the_run_as_preempted(script, cfg, data, tmp_path):
    """SIGTERM during the imports ends the run with exit code 75 and a PREEMPTED marker (not
    killed by the signal, -15, without one), so that a requeue script sees a preemption, not a
    failure."""
    argv = [script, *h.main_args(data, str(tmp_path), "early", "TRAIN.EPOCHS", "2")]
    if script == "main_seg.py":  # the seg demo's own model and data
        argv = [script, "--cfg", cfg, "--output", str(tmp_path), "--tag", "early"]
    log = str(tmp_path / "early.log")
    process = h.start(argv, log, prefix=())
    try:
        h.wait_for(lambda: importing_torch(process.pid), process, timeout=120, poll=0.005)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = h.read(log)
    assert code == 75, f"exit code {code}:\n{output[-3000:]}"
    assert ("SIGTERM received while the run started: stopped before training, nothing saved; "
            "run the same command again to resume (exit code 75)") in output, output[-3000:]
    markers = [os.path.join(root, name) for root, _, names in os.walk(tmp_path)
               for name in names if name == "PREEMPTED"]
    assert len(markers) == 1, markers
    with open(markers[0]) as f:
        lines = f.read().splitlines()
    assert {"checkpoint=none", "signal=SIGTERM", "step=start", "exit_code=75"} <= set(lines), lines
    assert not [name for _, _, names in os.walk(tmp_path) for name in names
                if name.endswith(".pth")]


def _two_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))[:2]


@pytest.fixture
def busy_cpus():
    """Two busy loops pinned to (at most) two CPUs, which the test's run is pinned to as well."""
    cpus = _two_cpus()
    spin = ("import os, sys; os.sched_setaffinity(0, {%d}); print('spinning', flush=True)\n"
            "while True: pass")
    spinners = [subprocess.Popen([sys.executable, "-c", spin % cpu], stdout=subprocess.PIPE,
                                 text=True) for cpu in cpus]
    try:
        for spinner in spinners:
            assert spinner.stdout.readline() == "spinning\n"
        yield cpus
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _demo_eval(env: dict[str, str], cpus: list[int], tmp_path) -> str:
    """The quick-start's config as printed, in --eval mode (the thread choice is the same, and
    it is short), pinned to ``cpus``; returns its output."""
    result = h.run_cli(["--cfg", h.DEMO_CFG, "--eval", "--output", str(tmp_path)], timeout=300,
                       env=env, preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)))
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_on_busy_cpus_the_demo_takes_one_thread_and_says_why(busy_cpus, tmp_path):
    """Not torch's default (one thread per core), which competes with the other programs: with
    it the quick-start took minutes per epoch instead of seconds on a busy 2-core machine."""
    env = {k: v for k, v in h.child_env().items() if k != "OMP_NUM_THREADS"}
    output = _demo_eval(env, busy_cpus, tmp_path)
    threads = [line for line in output.splitlines() if "CPU threads:" in line]
    assert len(threads) == 1, output[-3000:]
    assert f"CPU threads: 1 ({len(busy_cpus)} CPUs for this process, " in threads[0]
    assert " of them busy with other programs" in threads[0]
    if len(busy_cpus) > 1:
        assert threads[0].endswith("; set OMP_NUM_THREADS to choose another number"), threads


def test_omp_num_threads_is_kept(tmp_path):
    env = {**h.child_env(), "OMP_NUM_THREADS": "2"}
    output = _demo_eval(env, _two_cpus(), tmp_path)
    assert "CPU threads: 2 (OMP_NUM_THREADS=2)" in output, output[-3000:]
