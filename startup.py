"""What a run sets up at its first moment, before the heavy imports: stop signals are recorded
from the start, and the number of CPU threads suits the machine as it is (other programs'
load included). Imports nothing but the standard library (torch only inside
:func:`choose_cpu_threads`).

``main.py`` and ``main_seg.py`` call :func:`record_signals` before importing torch and timm
(seconds), so that a SIGTERM, SIGUSR1 or SIGINT arriving meanwhile is recorded instead of
killing the process with no trace; ``engine.preemption.Preemption`` takes the recorded signal over (the run
then stops as preempted, with exit code 75 and the ``PREEMPTED`` marker, before it trains)."""
from __future__ import annotations

import math
import os
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# (signal number, time.monotonic()) of each signal received while the recorder was installed.
received: list[tuple[int, float]] = []


def _record(signum: int, frame: object) -> None:
    received.append((signum, time.monotonic()))


def record_signals() -> None:
    """Records the stop signals from now on (until another handler replaces this one)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def restore_signal_defaults() -> None:
    """Where :func:`record_signals`' handler is in place, puts back Python's own handling of the
    stop signals (for a run that does not stop as preempted: --eval, --throughput) and delivers
    again the first signal recorded, if any: the process then ends as it would have without
    it."""
    if signal.getsignal(signal.SIGTERM) is not _record:
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    if received:
        os.kill(os.getpid(), received[0][0])


# ------------------------------------------------------------------------------------------------
# CPU threads
# ------------------------------------------------------------------------------------------------
def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of ``cpus`` since boot, from /proc/stat; None where unreadable."""
    busy = total = 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                    continue
                # user nice system idle iowait irq softirq steal
                ticks = [int(v) for v in fields[:8]]
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def busy_cpus(cpus: set[int], window_s: float = 0.3) -> float:
    """How many of ``cpus`` other programs keep busy: the larger of the share measured over
    ``window_s`` seconds (this process sleeps meanwhile) and the 1-minute load average (capped at
    the number of CPUs)."""
    load = 0.0
    try:
        load = min(os.getloadavg()[0], len(cpus))
    except (OSError, AttributeError):
        pass
    before = _cpu_times(cpus)
    if before is None:
        return load
    time.sleep(window_s)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return load
    now = len(cpus) * (after[0] - before[0]) / (after[1] - before[1])
    return max(now, load)


def choose_cpu_threads(processes_per_node: int = 1, adapt: bool = True) -> str:
    """Sets torch's CPU threads (intra-op) for a run on CPU and returns a line saying why.

    OMP_NUM_THREADS, when set, is kept. Otherwise each of the node's ``processes_per_node``
    processes gets its share of the CPUs this process may run on, less those other programs
    keep busy (:func:`busy_cpus`), at least 1 and at most torch's default (the physical cores):
    OpenMP threads that wait for a busy core make a step several times slower, a missing thread
    costs at most its share. Without ``adapt`` (DETERMINISTIC: the thread count can change the
    last bits of results, and a resume should repeat them) torch's default stays and the line
    only warns."""
    import torch

    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return f"CPU threads: {default} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return f"CPU threads: {default} (torch's default)"
    busy = busy_cpus(cpus)
    free = (len(cpus) - busy) / max(processes_per_node, 1)
    threads = max(1, min(default, math.floor(free + 0.3)))
    why = (f"{len(cpus)} CPUs for this process"
           + (f", {processes_per_node} processes on this node" if processes_per_node > 1 else "")
           + f", {busy:.1f} of them busy with other programs, torch's default {default}")
    if not adapt:
        line = f"CPU threads: {default} (torch's default; {why})"
        if threads < default:
            line += (f": with DETERMINISTIC the count is not lowered to {threads}; start with "
                     f"OMP_NUM_THREADS={threads}, or expect steps several times slower")
        return line
    torch.set_num_threads(threads)
    line = f"CPU threads: {threads} ({why})"
    if threads < default:
        line += "; set OMP_NUM_THREADS to choose another number"
    return line
