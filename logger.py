"""Run logging: coloured console output on rank 0, one log file per rank in the output folder."""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from termcolor import colored

_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"
# ``extra`` of a record for the log file alone (a traceback the console line summarises)
LOG_FILE_ONLY = {"log_file_only": True}


class _Pending(logging.handlers.BufferingHandler):
    """Holds the records meant for the log file until :func:`open_log_file`."""

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False


def create_logger(output_dir: str, dist_rank: int = 0, name: str = "",
                  defer: bool = False) -> logging.Logger:
    """A logger writing to ``output_dir/log_rank{dist_rank}.txt`` (appended, never truncated) and,
    on rank 0, to the console. With ``defer`` the file is opened only by :func:`open_log_file`,
    which writes the records held until then: a run that fails its checks before leaves the
    folder's log alone. Calling it again replaces the handlers it added before."""
    logger = logging.getLogger(name or "mg_ssaf")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()

    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter(
            colored("[%(asctime)s %(name)s]", "green")
            + colored("(%(filename)s %(lineno)d)", "yellow") + ": %(levelname)s %(message)s",
            datefmt=_DATEFMT))
        console.addFilter(lambda record: not getattr(record, "log_file_only", False))
        logger.addHandler(console)

    if defer:
        logger.addHandler(_Pending(capacity=0))
    else:
        open_log_file(logger, output_dir, dist_rank)
    return logger


def open_log_file(logger: logging.Logger, output_dir: str, dist_rank: int = 0) -> None:
    """Adds the log file ``output_dir/log_rank{dist_rank}.txt`` to ``logger`` and writes the
    records that a deferred logger held (a no-op when the file is open already)."""
    pending = [h for h in logger.handlers if isinstance(h, _Pending)]
    if any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        return
    file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{dist_rank}.txt"),
                                       mode="a", encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATEFMT))
    for handler in pending:
        for record in handler.buffer:
            file_handler.handle(record)
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(file_handler)
