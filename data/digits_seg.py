"""Semantic segmentation scenes composed from scikit-learn's digit scans (the CPU demo).

A scene is a ``size`` x ``size`` gray canvas holding 2-4 digit scans (8x8, 0..16 ink), each
upscaled by an integer factor (bilinear) and placed at a random non-overlapping position; the
label of a pixel is 1 + the digit where the upscaled scan's ink exceeds ``ink_threshold`` (of
16), else 0 (background): 11 classes. Train scenes use only the train scans of data/digits.py's
fixed 80/20 split and val scenes only its val scans, so validation digits are unseen scans.
Scenes are deterministic per (split, index) (val) or per (seed, epoch, index) (train).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from .digits import digits_split
from .seg_pipeline import item_rng, to_tensor

NUM_CLASSES = 11
CLASS_NAMES = ["background"] + [str(d) for d in range(10)]
# Val scenes are fixed: their generator is seeded from this (never change: results compare).
VAL_SEED = 12345


class DigitsSegDataset(Dataset):
    """Items ``((3, size, size) normalised float tensor, (size, size) int64 label)``; train items
    are drawn anew each epoch (``set_epoch``), val items are the same on every call."""

    def __init__(self, is_train: bool, size: int = 64, length: int | None = None,
                 scales: tuple[int, ...] = (2, 3, 4), ink_threshold: float = 4.0,
                 seed: int = 0) -> None:
        digits = load_digits()
        train_idx, val_idx = digits_split()
        idx = train_idx if is_train else val_idx
        self.scans = digits.images[idx].astype(np.float32)  # (N, 8, 8), 0..16
        self.targets = digits.target[idx]
        self.is_train, self.size, self.scales = is_train, size, scales
        self.ink_threshold, self.seed, self.epoch = ink_threshold, seed, 0
        self.length = length if length is not None else len(idx)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int, rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(size, size, 3) uint8 image and (size, size) uint8 label of scene ``index``, drawn
        from ``rng`` (default: the generator of (seed, epoch, index), fixed for val)."""
        if rng is None:
            rng = (item_rng(self.seed, self.epoch, index) if self.is_train
                   else item_rng(VAL_SEED, 0, index))
        canvas = np.zeros((self.size, self.size), np.float32)
        label = np.zeros((self.size, self.size), np.uint8)
        occupied = np.zeros_like(label, dtype=bool)
        for _ in range(int(rng.integers(2, 5))):
            k = int(rng.integers(len(self.scans)))
            side = 8 * int(rng.choice(self.scales))
            for _ in range(20):  # a free spot (boxes never overlap)
                y, x = (int(v) for v in rng.integers(0, self.size - side + 1, size=2))
                if not occupied[y:y + side, x:x + side].any():
                    break
            else:
                continue
            scan = np.asarray(Image.fromarray(self.scans[k]).resize((side, side), Image.BILINEAR))
            canvas[y:y + side, x:x + side] = scan
            label[y:y + side, x:x + side] = np.where(scan > self.ink_threshold,
                                                     1 + self.targets[k], 0)
            occupied[y:y + side, x:x + side] = True
        image = np.clip(canvas * (255.0 / 16.0), 0, 255).astype(np.uint8)
        return np.repeat(image[..., None], 3, axis=2), label

    def __getitem__(self, index: int):
        return self.draw(index, None)

    def draw(self, index: int, rng: np.random.Generator | None):
        """Scene ``index`` drawn from ``rng`` as (image tensor, int64 label)."""
        image, label = self.scene(index, rng)
        return to_tensor(image), torch.from_numpy(label.astype(np.int64))
