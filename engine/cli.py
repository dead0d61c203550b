"""The command line of ``main.py`` and ``main_seg.py``: parse, configure, run a task, and turn
the way the run ended into a message and an exit code.

Exit codes: 0 done, 1 bad input, a diverged run or a failure (a rank died, a save failed, the run
folder is held by another run: the message says which), 2 bad command line, 75 preempted
(SIGTERM, SIGUSR1 or Ctrl-C: a checkpoint was saved and named in the file PREEMPTED of the run
folder; run the same command again to resume)."""
from __future__ import annotations

import logging
import os
import re
import sys

import torch.distributed as dist
from yacs.config import CfgNode as CN

import startup
from config import ConfigError, check_config, get_config, parse_option
from data import DataError
from logger import LOG_FILE_ONLY
from models.checkpoint_io import CheckpointError
from utils import (RunError, check_in, get_rank, get_world_size, prepare_output_dir, record_failure,
                   recorded_failures, release_run_locks)

from .checkpoint import CheckpointSaver
from .preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption
from .run import LOGGER_NAME, Run
from .task import Task
from .trainer import NonFiniteLossError


def report(message: str, level: int = logging.ERROR) -> None:
    """Logs why the run ends (console on rank 0, every rank's log file); ranks without a console,
    and runs that failed before their logger existed, print it to stderr as well."""
    logger = logging.getLogger(LOGGER_NAME)
    prefix = f"[rank {get_rank()}] " if get_world_size() > 1 else ""
    if logger.handlers:
        logger.log(level, prefix + message)
    if get_rank() != 0 or not logger.handlers:
        print(f"{prefix}{logging.getLevelName(level).lower()}: {message}", file=sys.stderr,
              flush=True)


def stop_before_training(config: CN, preemption: Preemption) -> None:
    """Stops a run that received a stop signal while it started, before it builds or trains
    anything: the marker PREEMPTED (rank 0) says so (``checkpoint=none``, ``step=start``: this
    run saved nothing; the rerun resumes from the folder's newest checkpoint, if any)."""
    if os.environ.get("RANK", "0") == "0":  # the process group does not exist yet
        prepare_output_dir(config.OUTPUT)
        CheckpointSaver(config, logging.getLogger(LOGGER_NAME)).write_preempted_marker(
            "none", preemption.signal_name, "none", "start")
    raise Preempted(f"{preemption.signal_name} received while the run started: stopped before "
                    "training, nothing saved")


def configure(argv: list[str] | None, task: Task) -> CN:
    """The frozen config of the command line ``argv``, with the task's derived keys, checked."""
    config = get_config(parse_option(argv, task.prog, task.what))
    config.defrost()
    task.prepare_config(config)
    config.freeze()
    check_config(config)
    return config


# What a collective raises when a peer is gone or silent: DistError (NCCL), a RuntimeError from
# gloo ("[.../gloo/transport/tcp/pair.cc] Connection closed by peer", "[.../gloo/...] Timed out
# waiting ..."; every such message names a gloo source file).
_BROKEN_COLLECTIVE = re.compile(r"gloo|nccl|connection (closed|reset)", re.I)


def collective_broke(error: Exception) -> bool:
    """Whether ``error`` is a collective's failure rather than this rank's own."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and bool(_BROKEN_COLLECTIVE.search(str(error))))


def fail_collectively(error: Exception, config: CN | None) -> None:
    """An unexpected error of a multi-process run. This rank's own error is logged with its
    traceback and recorded for the peers (``utils.record_failure``). A broken collective most
    often means that a peer failed or hung: the line says which (the failure a peer recorded,
    else the ranks that do not check in), the traceback goes to the log file only. Then the
    process exits without waiting for the process group's threads (which could hang or abort the
    interpreter at exit)."""
    logger = logging.getLogger(LOGGER_NAME)
    line = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    timeout = config.DIST_TIMEOUT if config is not None else "?"
    if not collective_broke(error):
        logger.exception("traceback")
        record_failure(line)
        report(f"{line}\nThis rank failed; the others stop at their next collective (at the "
               f"latest after DIST_TIMEOUT, {timeout} s); a failure, not a preemption (no "
               "PREEMPTED marker)")
        exit_now(1)
    # the traceback for the log file (the console has the line below), once the file is open
    opened = any(isinstance(h, logging.FileHandler) for h in logger.handlers)
    logger.error("traceback", exc_info=error, extra=LOG_FILE_ONLY if opened else None)
    # Every rank still alive checks in (through the store, not a collective): those that do not
    # are named, with the failures they recorded. Never a preemption, even after a signal: no
    # PREEMPTED marker.
    missing = check_in("failed", 5.0)
    causes = recorded_failures() if missing is not None else {}
    silent = [r for r in missing or [] if r not in causes]
    who = "; ".join(
        [f"rank {r} failed: {m}" for r, m in sorted(causes.items())]
        + ([f"rank(s) {', '.join(map(str, silent))} died or hung (no answer from it within 5 s "
            "of the failure)"] if silent else []))
    if not who:
        who = ("every rank is alive: one of them failed (see its log)" if missing == [] else
               "could not tell which rank failed (the process group's store is gone too: "
               "rank 0 holds it without torchrun)")
    report(f"{line}\nWith {get_world_size()} processes this usually means another rank failed "
           f"or did not answer within DIST_TIMEOUT ({timeout} s): {who}; a failure, not a "
           "preemption (no PREEMPTED marker)")
    exit_now(1)


def exit_now(code: int) -> None:
    """Ends a process of a multi-process run with ``code`` at once, its log and output flushed:
    no interpreter shutdown, where the process group's threads could hang or abort it
    ("terminate called without an active exception", exit code -6 instead of ``code``)."""
    release_run_locks()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(task: Task, argv: list[str] | None = None) -> int:
    """Runs ``task`` with the command line ``argv`` (default: sys.argv); returns the exit code."""
    preemption, config = Preemption(), None
    try:
        config = configure(argv, task)
        if not (config.EVAL_MODE or config.THROUGHPUT_MODE):
            preemption.install()
            if preemption.requested:
                stop_before_training(config, preemption)
        else:
            startup.restore_signal_defaults()  # a signal ends --eval/--throughput as before
        Run(config, task, preemption).execute()
        code = 0
    except Preempted as e:
        report(f"preempted: {e}; run the same command again to resume (exit code "
               f"{PREEMPTED_EXIT_CODE})", logging.WARNING)
        code = PREEMPTED_EXIT_CODE
    except NonFiniteLossError as e:
        report(f"{e}; the checkpoints already in the output folder are untouched")
        record_failure(str(e))
        code = 1
    except (ConfigError, DataError, RunError, CheckpointError) as e:
        message = str(e)
        if "Original Traceback" in message:  # raised in a loader worker: keep the message itself
            message = message.strip().splitlines()[-1]
        report(message)
        record_failure(message)
        code = 1
    except Exception as e:
        if get_world_size() == 1:
            raise
        fail_collectively(e, config)
    if code == 1 and dist.is_initialized() and get_world_size() > 1:
        exit_now(code)  # a failure: the peers may be gone, so no orderly teardown
    if dist.is_initialized():
        dist.destroy_process_group()
    return code
