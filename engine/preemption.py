"""Stop signals during training: one handler, one list of signals (``startup.STOP_SIGNALS``).

SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) ask training to stop after the current optimizer step; the
engine then saves a checkpoint, writes the run folder's ``PREEMPTED`` marker
(:class:`engine.checkpoint.CheckpointSaver`) and exits with :data:`PREEMPTED_EXIT_CODE`. Loader
workers ignore the same signals (``data.build.Loader``)."""
from __future__ import annotations

import os
import signal
import time

import startup

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, resumable


class Preempted(Exception):
    """Training stopped on a stop signal after saving a checkpoint (or before training)."""


class Preemption:
    """Turns the stop signals into a request to stop after the current optimizer step; a second
    signal ends the process at once, unless it comes within ``REPEAT_WINDOW_S`` of the first (the
    same request delivered twice, e.g. by Slurm to the process group and again by a launcher)."""
    REPEAT_WINDOW_S = 1.0

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.received_at = 0.0

    def install(self) -> None:
        """Handles the signals from now on and takes over the first one that came while the
        program started (``startup.record_signals``), if any."""
        for sig in startup.STOP_SIGNALS:
            signal.signal(sig, self._handle)
        if startup.received and self.signal_name is None:
            signum, self.received_at = startup.received[0]
            self.signal_name = signal.Signals(signum).name

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.monotonic()
        elif time.monotonic() - self.received_at > self.REPEAT_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def source(self) -> str:
        """The signal's name, for messages; a stop can also come from another rank's signal."""
        return self.signal_name or "a signal on another rank"
