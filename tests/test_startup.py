"""The first moments of a run, through the real command line: a stop signal during the imports
stops it as preempted (issue 20, finding 11)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pipeline_helpers as h

SEG_DEMO = os.path.join(h.ROOT, "configs", "seg", "upernet_mg_ssaf_nano_digits.yaml")


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended early with code {process.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def importing_torch(pid: int) -> bool:
    """Whether the process has mapped libtorch: it is importing torch (seconds before a run's own
    code starts)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("script, cfg", [("main.py", h.CFG), ("main_seg.py", SEG_DEMO)],
                         ids=["main", "main_seg"])
def test_a_signal_while_importing_stops_the_run_as_preempted(script, cfg, data, tmp_path):
    """Before, SIGTERM during the imports killed the process (-15) and left no PREEMPTED: a
    requeue script took the preemption for a failure."""
    argv = [script, *h.main_args(data, str(tmp_path), "early", "TRAIN.EPOCHS", "2")]
    if script == "main_seg.py":  # the seg demo's own model and data
        argv = [script, "--cfg", cfg, "--output", str(tmp_path), "--tag", "early"]
    log = str(tmp_path / "early.log")
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *argv], cwd=h.ROOT, env=h.child_env(),
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: importing_torch(process.pid), process)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with open(log) as f:
        output = f.read()
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
