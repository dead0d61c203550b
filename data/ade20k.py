"""ADE20K (SceneParsing, ADEChallengeData2016) for semantic segmentation, 150 classes.

Layout: ``<root>/images/{training,validation}/<name>.jpg`` with
``<root>/annotations/{training,validation}/<name>.png`` (0 = other, 1..150 = classes). Labels are
read with reduce_zero_label as mmseg's: 0 becomes the ignore index 255, every other label minus
1, and a raw 255 (what some tools write for "unlabelled") stays 255, ignored. Any other raw value
(151..254) is refused, its annotation named. The classes' names come from the folder's
``objectInfo150.txt`` where it has one (:func:`read_class_names`).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .common import (DECODE_ERRORS, BadImageError, DataError, SkippedImages,
                     load_rgb_image)
from .seg_pipeline import item_rng

NUM_CLASSES = 150
IGNORE_INDEX = 255
CLASS_INFO = "objectInfo150.txt"  # the class table the ADEChallengeData2016 folder ships
CLASS_INFO_HEADER = ["Idx", "Ratio", "Train", "Val", "Name"]  # its tab-separated columns


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignored), k -> k - 1 for k in 1..254, 255 -> 255 (still ignored), uint8: mmseg
    0.11's ``LoadAnnotations(reduce_zero_label=True)``."""
    reduced = label.astype(np.int16) - 1
    reduced[(label == 0) | (label == 255)] = 255
    return reduced.astype(np.uint8)


def load_label_map(path: str) -> np.ndarray:
    """The raw labels of annotation ``path`` as an array; a file that cannot be decoded raises
    BadImageError naming it."""
    try:
        with open(path, "rb") as f:
            label = Image.open(f)
            label.load()
            return np.asarray(label)
    except DECODE_ERRORS as e:
        raise BadImageError(f"ADE20K: cannot read annotation {path}: {e}") from None


def check_label_values(label: np.ndarray, path: str) -> None:
    """Refuses raw labels other than 0..NUM_CLASSES and IGNORE_INDEX (a value the loss would
    take for a class the model does not have), naming ``path`` and the values."""
    wrong = ((label < 0) | (label > NUM_CLASSES)) & (label != IGNORE_INDEX)
    if wrong.any():
        values = np.unique(label[wrong])
        shown = ", ".join(str(v) for v in values[:10])
        if len(values) > 10:
            shown += f" and {len(values) - 10} more"
        raise DataError(f"ADE20K: annotation {path} has {int(wrong.sum())} pixel(s) of value(s) "
                        f"{shown}: expected 0..{NUM_CLASSES} (0 = other) or {IGNORE_INDEX} "
                        f"(unlabelled)")


def parse_class_info(lines: list[str]) -> list[str]:
    """The first name of each class ('building' of 'building, edifice') from the lines of an
    objectInfo150.txt: the header, then rows 1..NUM_CLASSES (fields and names may end with
    spaces, as the official file's do). ValueError saying what is wrong where they are not."""
    lines = [line for line in lines if line.strip()]
    rows = [[field.strip() for field in line.split("\t")] for line in lines]
    if not rows or rows[0] != CLASS_INFO_HEADER:
        got = repr(lines[0]) if lines else "an empty file"
        raise ValueError(f"expected the header line {' '.join(CLASS_INFO_HEADER)} "
                         f"(tab-separated), got {got}")
    if len(rows) != NUM_CLASSES + 1:
        raise ValueError(f"{len(rows) - 1} class rows, expected {NUM_CLASSES}")
    names = []
    for k, (line, row) in enumerate(zip(lines[1:], rows[1:]), start=1):
        if len(row) != len(CLASS_INFO_HEADER) or row[0] != str(k):
            raise ValueError(f"row {k} is {line!r}: expected {len(CLASS_INFO_HEADER)} "
                             f"tab-separated fields starting with Idx {k}")
        name = row[-1].split(",")[0].strip()
        if not name:
            raise ValueError(f"row {k} has no name")
        names.append(name)
    return names


def read_class_names(root: str) -> tuple[str, ...] | None:
    """The classes' names in label order (0..NUM_CLASSES - 1) from ``<root>/objectInfo150.txt``;
    None where there is no such file, or, with a warning naming it, where it cannot be read or is
    not the table :func:`parse_class_info` expects (the caller then numbers the classes). A file
    is read (and warned about) once per process until it changes."""
    path = os.path.join(root, CLASS_INFO)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _class_names(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _class_names(path: str, mtime_ns: int, size: int) -> tuple[str, ...] | None:
    """:func:`read_class_names` of the file ``path`` as it is at (``mtime_ns``, ``size``)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is dropped
            return tuple(parse_class_info(f.read().splitlines()))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        logging.getLogger("mg_ssaf").warning(f"ADE20K: class names not read from {path} ({e}): "
                                             f"classes are numbered 0..{NUM_CLASSES - 1}")
        return None


def load_pair(path: str, ann: str) -> tuple[Image.Image, Image.Image]:
    """The RGB image ``path`` and the reduced label of annotation ``ann`` (a PIL 'L' image),
    checked to match in size and to hold only 0..NUM_CLASSES and IGNORE_INDEX."""
    image = load_rgb_image(path)
    label = load_label_map(ann)
    if label.ndim != 2:
        raise DataError(f"ADE20K: annotation {ann} is not a single-channel label map")
    if label.shape[::-1] != image.size:
        raise DataError(f"ADE20K: annotation {ann} is {label.shape[1]}x{label.shape[0]} but "
                        f"image {path} is {image.size[0]}x{image.size[1]}")
    check_label_values(label, ann)
    return image, Image.fromarray(reduce_zero_label(label))


class ADE20K(Dataset):
    """One split ('training' or 'validation') of ADEChallengeData2016. Items are
    ``transform(image, label, rng)`` where ``rng`` is seeded from (seed, epoch, index); call
    ``set_epoch`` before each pass. With ``skip_bad_images`` an item whose image or annotation
    cannot be read is replaced by the next readable one, with a warning, and counted (see
    :meth:`pop_skipped`); every other data error stops the run."""

    def __init__(self, root: str, split: str, transform: Callable, seed: int = 0,
                 skip_bad_images: bool = False) -> None:
        image_dir = os.path.join(root, "images", split)
        self.ann_dir = os.path.join(root, "annotations", split)
        if not os.path.isdir(image_dir):
            raise DataError(f"ADE20K: no folder {image_dir} (expected the ADEChallengeData2016 "
                            f"layout images/{{training,validation}}/*.jpg)")
        self.images = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir)
                             if f.lower().endswith(".jpg"))
        if not self.images:
            raise DataError(f"ADE20K: no .jpg images in {image_dir}")
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.skips = SkippedImages(skip_bad_images, image_dir)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def annotation_path(self, index: int) -> str:
        name = os.path.splitext(os.path.basename(self.images[index]))[0]
        return os.path.join(self.ann_dir, name + ".png")

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """Item ``index``'s image and reduced label, as :func:`load_pair` reads them."""
        path, ann = self.images[index], self.annotation_path(index)
        if not os.path.isfile(ann):
            raise DataError(f"ADE20K: image {path} has no annotation {ann}")
        return load_pair(path, ann)

    def __getitem__(self, index: int):
        return self.draw(index, item_rng(self.seed, self.epoch, index))

    def draw(self, index: int, rng: np.random.Generator):
        """Item ``index`` transformed with the random draws of ``rng``."""
        image, label = self.skips.first_readable(self.load, index, len(self))
        return self.transform(image, label, rng)

    def pop_skipped(self) -> int:
        """Items skipped since the last call (made between epochs, while no worker loads)."""
        return self.skips.pop()


def build_ade20k(root: str, is_train: bool, transform: Callable, seed: int = 0,
                 skip_bad_images: bool = False) -> ADE20K:
    return ADE20K(root, "training" if is_train else "validation", transform, seed,
                  skip_bad_images)
