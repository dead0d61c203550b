"""Train, evaluate or time MG-SSAF on ImageNet-style folders (Swin Transformer's command line).

    python main.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml --data-path <imagenet>
    python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg ... --data-path ...
    torchrun --nproc_per_node 8 main.py --cfg ... --data-path ...
    python main.py --cfg ... --data-path ... --eval --resume ckpt.pth
    python main.py --cfg ... --data-path ... --throughput --disable_amp

Exit codes: 0 done, 1 bad input, a diverged run or a failure (a rank died, a save failed, the run
folder is held by another run: the message says which), 2 bad command line, 75 preempted
(SIGTERM, SIGUSR1 or Ctrl-C: a checkpoint was saved and named in the file PREEMPTED of the run
folder; run the same command again to resume). The engine is ``engine/``; this file picks the
task.
"""
from __future__ import annotations

import startup  # standard library only: first, so that stop signals count from the first moment

if __name__ == "__main__":
    startup.record_signals()  # until Preemption.install (torch and timm take seconds to import)

import sys

from engine import cli
from engine.classification import ClassificationTask


def main(argv: list[str] | None = None) -> int:
    """Image classification with the command line ``argv``; returns the exit code."""
    return cli.main(ClassificationTask(), argv)


if __name__ == "__main__":
    sys.exit(main())
