"""Semantic segmentation with UPerNet on an MG-SSAF backbone (ADE20K; the digits demo), on the
same engine as main.py (``engine/``): same command line, launchers, AMP, checkpoints,
auto-resume, preemption and metrics.jsonl. Training counts iterations (optimizer steps): an
engine "epoch" is SEG.EVAL_INTERVAL of them, each followed by evaluation (aAcc / mAcc / mIoU) and
a checkpoint.

    python main_seg.py --cfg configs/seg/upernet_mg_ssaf_t_512x512_160k_ade20k.yaml \\
        --data-path ADEChallengeData2016 --pretrained mg_ssaf_t.pth
"""
from __future__ import annotations

import startup  # standard library only: first, so that stop signals count from the first moment

if __name__ == "__main__":
    startup.record_signals()  # until Preemption.install (torch takes seconds to import)

import sys

from engine import cli
from engine.segmentation import SegmentationTask


def main(argv: list[str] | None = None) -> int:
    """Segmentation with the command line ``argv``; returns the exit code."""
    return cli.main(SegmentationTask(), argv)


if __name__ == "__main__":
    sys.exit(main())
