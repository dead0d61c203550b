"""Run logging: coloured console output on rank 0, one log file per rank in the output folder."""
from __future__ import annotations

import logging
import os
import sys

from termcolor import colored

_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def create_logger(output_dir: str, dist_rank: int = 0, name: str = "") -> logging.Logger:
    """A logger writing to ``output_dir/log_rank{dist_rank}.txt`` (appended, never truncated) and,
    on rank 0, to the console. Calling it again replaces the handlers it added before."""
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
        logger.addHandler(console)

    file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{dist_rank}.txt"),
                                       mode="a", encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATEFMT))
    logger.addHandler(file_handler)
    return logger
