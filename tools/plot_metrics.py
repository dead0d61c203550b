"""Plot train loss, val loss and Acc@1 (mIoU for main_seg.py) per epoch of runs into one PNG.

Each run folder (``<OUTPUT>/<MODEL.NAME>/<TAG>``) holds the ``metrics.jsonl`` that main.py appends
to after every epoch: one JSON object a line with at least ``epoch``, ``train_loss``, ``val_loss``
and ``acc1`` (main_seg.py: ``mIoU``; an epoch is SEG.EVAL_INTERVAL iterations there). Runs are
overlaid and labelled with their folder (or ``--labels``).

    python tools/plot_metrics.py output/mg_ssaf_nano/default [more runs...] [--out FILE.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

METRICS_FILE = "metrics.jsonl"
# (key in metrics.jsonl, panel title) of the loss panels; the third panel shows the run's score.
PANELS = (("train_loss", "train loss"), ("val_loss", "val loss"))
SCORES = {"acc1": "Acc@1", "mIoU": "mIoU"}  # classification (main.py), segmentation (main_seg.py)


def score_key(row: dict) -> str | None:
    """The score of a metrics.jsonl row: 'acc1' or 'mIoU' (None when it has neither)."""
    return next((k for k in SCORES if k in row), None)


class MetricsError(ValueError):
    """A run folder without usable metrics."""


def read_metrics(run_dir: str) -> list[dict]:
    """The epochs of ``run_dir/metrics.jsonl`` in order (a repeated epoch, as after a resume
    from an earlier checkpoint, keeps its last line)."""
    if not os.path.isdir(run_dir):
        raise MetricsError(f"run folder not found: {run_dir}")
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        below = sorted(os.path.join(root, METRICS_FILE) for root, _, files in os.walk(run_dir)
                       if METRICS_FILE in files)
        hint = f"; found {', '.join(below[:5])} below it: pass that folder" if below else ""
        raise MetricsError(f"no {METRICS_FILE} in {run_dir} (expected {path}){hint}")
    by_epoch: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}:{lineno}: not a JSON line: {e}") from None
            missing = [k for k in ("epoch",) + tuple(k for k, _ in PANELS)
                       if not isinstance(row, dict) or k not in row]
            if isinstance(row, dict) and score_key(row) is None:
                missing.append(" or ".join(SCORES))
            if missing:
                raise MetricsError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            by_epoch[int(row["epoch"])] = row
    if not by_epoch:
        raise MetricsError(f"{path} is empty: the run has not finished an epoch yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_metrics(run_dirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None) -> str:
    """Writes the figure of ``run_dirs`` to ``out`` (PNG) and returns ``out``."""
    if labels is not None and len(labels) != len(run_dirs):
        raise MetricsError(f"--labels gives {len(labels)} label(s) for {len(run_dirs)} run(s)")
    runs = [read_metrics(d) for d in run_dirs]  # every folder is checked before anything is drawn
    score = score_key(runs[0][0])
    panels = PANELS + ((score, f"val {SCORES[score]} (%)"),)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for i, (run_dir, rows) in enumerate(zip(run_dirs, runs)):
        label = labels[i] if labels else os.path.normpath(run_dir)
        key = score_key(rows[-1])
        label += f" (last {SCORES[key]} {rows[-1][key]:.1f})"
        epochs = [r["epoch"] for r in rows]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(epochs, [r.get(key, float("nan")) for r in rows], marker="o", markersize=3,
                    label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="OUTPUT_DIR",
                        help=f"run folder(s) holding {METRICS_FILE}")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default: <run>/metrics.png for one run, "
                             "metrics.png in the current folder for several)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    out = args.out or (os.path.join(args.run_dirs[0], "metrics.png") if len(args.run_dirs) == 1
                       else "metrics.png")
    try:
        print(f"wrote {plot_metrics(args.run_dirs, out, args.labels)}")
    except MetricsError as e:
        sys.exit(f"plot_metrics: error: {e}")


if __name__ == "__main__":
    main()
