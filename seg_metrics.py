"""Semantic segmentation metrics from totals over a whole validation set (as mmsegmentation).

Each rank accumulates per-class intersection / union / predicted area / label area of its images
in a ``SegMetrics``; the trainer sums ``totals`` across ranks (one all_reduce) and calls
``summary``. Classes absent from the labels (union of label area = 0) have IoU/Acc nan and are
left out of the means.
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
    (numpy arrays, percent) from (4, num_classes) totals."""
    inter, union, _, area_label = totals.double().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(area_label > 0, inter / union, np.nan) * 100
        acc = np.where(area_label > 0, inter / area_label, np.nan) * 100
    a_acc = inter.sum() / max(area_label.sum(), 1) * 100
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
