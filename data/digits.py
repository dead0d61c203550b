"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) as a Dataset.

The scans are read from the installed scikit-learn package (no download). They are split once,
stratified, about 80/20, with a fixed seed, so every machine and every rank sees the same split.
Items are ``(transform(image), label)`` where ``image`` is an 8x8 RGB ``PIL.Image`` (the 0..16
scan scaled to 0..255, the gray level copied to three channels), so the digits go through the
same transform path as ImageNet images, which resizes them to ``DATA.IMG_SIZE``.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

NUM_CLASSES = 10
# Fraction of the scans held out for validation, and the seed of the split (never change these:
# results and checkpoints are only comparable on the same split).
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices into ``load_digits()`` of the train and the val split (stratified, fixed)."""
    labels = load_digits().target
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=VAL_FRACTION,
                                          random_state=SPLIT_SEED, stratify=labels)
    return np.sort(train_idx), np.sort(val_idx)


class DigitsDataset(Dataset):
    """One split of the digits; ``classes``, ``class_to_idx`` and ``targets`` as in ImageFolder."""

    def __init__(self, indices: np.ndarray, transform: Optional[Callable] = None) -> None:
        digits = load_digits()
        self.indices = np.asarray(indices)
        self.images = np.round(digits.images[self.indices] * (255.0 / 16.0)).astype(np.uint8)
        self.targets = [int(t) for t in digits.target[self.indices]]
        self.classes = [str(c) for c in digits.target_names]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def build_digits_dataset(is_train: bool, transform: Optional[Callable] = None) -> DigitsDataset:
    """The train (``is_train``) or val split, each image passed through ``transform``."""
    train_idx, val_idx = digits_split()
    return DigitsDataset(train_idx if is_train else val_idx, transform)
