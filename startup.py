"""What a run sets up at its first moment, before the heavy imports: stop signals are recorded
from the start. Imports nothing but the standard library.

``main.py`` and ``main_seg.py`` call :func:`record_signals` before importing torch and timm
(seconds), so that a SIGTERM, SIGUSR1 or SIGINT arriving meanwhile is recorded instead of
killing the process with no trace; ``main.Preemption`` takes the recorded signal over (the run
then stops as preempted, with exit code 75 and the ``PREEMPTED`` marker, before it trains)."""
from __future__ import annotations

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
