"""Semantic segmentation metrics from totals over a whole validation set (as mmsegmentation).

Each rank accumulates per-class intersection / union / predicted area / label area of its images
in a ``SegMetrics``; the trainer sums ``totals`` across ranks (one all_reduce) and calls
``summary``. The numbers are mmsegmentation 0.11's (``eval_metrics``, ``CustomDataset.evaluate``):
per class IoU = intersection / union and Acc = intersection / label area, each nan only where its
denominator is 0 (a class predicted but absent from the labels has IoU 0, Acc nan; a class neither
predicted nor labelled has both nan); mIoU / mAcc are the means over the classes that are not nan;
aAcc is the total intersection over the total label area. Pixels labelled ``ignore_index`` count
nowhere. mmseg rounds what it reports to 2 decimals (percent); the log prints 2 decimals, and
metrics.jsonl keeps the unrounded values.
"""
import numpy as np
import torch

__all__ = ["SegMetrics", "intersect_and_union", "summarize", "format_table"]


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = 255) -> torch.Tensor:
    """(4, num_classes) int64 totals: intersection, union, predicted area, label area of one or
    more (..., H, W) predictions (class indices) against labels of the same shape, pixels whose
    label is ``ignore_index`` left out."""
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    inter = torch.bincount(pred[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])


class SegMetrics:
    """Running (4, num_classes) totals (see ``intersect_and_union``) on ``device``."""

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.totals = torch.zeros(4, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.totals += intersect_and_union(pred.to(self.totals.device),
                                           label.to(self.totals.device),
                                           self.num_classes, self.ignore_index)

    def summary(self) -> dict:
        return summarize(self.totals)


def summarize(totals: torch.Tensor) -> dict:
    """aAcc, mAcc, mIoU (percent; nan classes left out of the means) and per-class IoU / Acc
    (numpy arrays, percent) from (4, num_classes) totals, as mmseg 0.11 (module docstring)."""
    inter, union, _, area_label = totals.double().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union * 100  # 0/0 = nan: neither predicted nor labelled
        acc = inter / area_label * 100  # nan: not labelled
        a_acc = inter.sum() / area_label.sum() * 100  # nan only when every pixel is ignored
    return {"aAcc": float(a_acc), "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any()
            else float("nan"), "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any()
            else float("nan"), "IoU": iou, "Acc": acc}


def format_table(summary: dict, class_names: list[str]) -> str:
    """Per-class IoU / Acc table, then the means, as lines for the log."""
    width = max(len("Class"), *(len(n) for n in class_names))
    lines = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, summary["IoU"], summary["Acc"]):
        lines.append(f"{name:<{width}}  {iou:6.2f}  {acc:6.2f}")
    lines.append(f"aAcc {summary['aAcc']:.2f}  mIoU {summary['mIoU']:.2f}  "
                 f"mAcc {summary['mAcc']:.2f}")
    return "\n".join(lines)
