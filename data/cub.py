"""CUB-200-2011 (Caltech-UCSD Birds, 200 species) in its official layout, as the paper fine-tunes
on it: DATA.DATA_PATH is the ``CUB_200_2011`` folder holding

    classes.txt               <class id> <class name>             (ids 1..200)
    images.txt                <image id> <path under images/>
    image_class_labels.txt    <image id> <class id>
    train_test_split.txt      <image id> <1: train, 0: test>
    images/<class name>/<file>.jpg

The official split has 5,994 training and 5,794 test images; the test images are the validation
set (as in the paper). Labels are the class ids minus one. Each of these is an error naming the
file and line: a missing list file, a line that does not parse, an id listed twice, an image id
of images.txt without a label or split line, a label or split line for an id that images.txt
does not list, an images.txt path that is absolute or leaves images/ once normalised (``..``),
and one image file under two ids (it would be in both splits, or counted twice). The paths are
checked as written, so symlinks inside the folder (images/ on another disk, a class folder
linked from elsewhere) work; two entries that reach the same file through links are one file.
"""
from __future__ import annotations

import os
import stat
from typing import Callable

from .common import DataError, ImageFolderDataset

LIST_FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt")


def _read_pairs(root: str, name: str) -> dict[int, tuple[str, int]]:
    """``<int id> <value>`` per line of ``root/name`` -> {id: (value, line number)}."""
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: DATA.DATA_PATH (--data-path) must be the "
                        f"CUB_200_2011 folder, holding {', '.join(LIST_FILES)} and images/")
    pairs: dict[int, tuple[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise DataError(f"{path}, line {number}: expected '<id> <value>', got "
                                f"{line.rstrip()!r}")
            key = int(parts[0])
            if key in pairs:
                raise DataError(f"{path}, line {number}: id {key} appears twice (first on line "
                                f"{pairs[key][1]})")
            pairs[key] = (parts[1].strip(), number)
    if not pairs:
        raise DataError(f"{path} is empty")
    return pairs


def _as_int(path: str, key: int, entry: tuple[str, int], allowed: set[int] | range) -> int:
    value, number = entry
    if not value.isdigit() or int(value) not in allowed:
        raise DataError(f"{path}, line {number}: image {key} has {value!r}, expected one of "
                        f"{min(allowed)}..{max(allowed)}")
    return int(value)


def _check_ids(root: str, name: str, table: dict[int, tuple[str, int]],
               images: dict[int, tuple[str, int]]) -> None:
    """Every image of images.txt has a line in ``name``, and every line of ``name`` an image."""
    path = os.path.join(root, name)
    for key in sorted(table, key=lambda k: table[k][1]):
        if key not in images:
            raise DataError(f"{path}, line {table[key][1]}: image id {key} is not in "
                            f"{os.path.join(root, 'images.txt')}")
    missing = sorted(set(images) - set(table))
    if missing:
        raise DataError(f"{path}: no line for image id(s) "
                        f"{missing[:5]}{' ...' if len(missing) > 5 else ''} of images.txt")


def _image_path(root: str, key: int, entry: tuple[str, int]) -> str:
    """``root/images/<entry>``; refuses an absolute entry or one that leaves images/."""
    value, number = entry
    relative = os.path.normpath(value)
    if os.path.isabs(value) or relative == os.curdir or relative.split(os.sep)[0] == os.pardir:
        raise DataError(f"{os.path.join(root, 'images.txt')}, line {number}: image {key} has "
                        f"path {value!r}, expected a path of a file under images/ (relative, "
                        "without '..' leading out of it)")
    return os.path.join(root, "images", relative)


def read_cub_split(root: str, is_train: bool) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (in class-id order) and ``(image path, label)`` of the train or test split."""
    classes = _read_pairs(root, "classes.txt")
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise DataError(f"{os.path.join(root, 'classes.txt')}: class ids must be 1..{len(classes)}")
    images = _read_pairs(root, "images.txt")
    labels = _read_pairs(root, "image_class_labels.txt")
    split = _read_pairs(root, "train_test_split.txt")
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split)):
        _check_ids(root, name, table, images)
    wanted = 1 if is_train else 0
    samples, absent = [], []
    first: dict[object, int] = {}  # the file (device, inode) or, if absent, its path -> image id
    for key in sorted(images):
        path = _image_path(root, key, images[key])
        try:
            info = os.stat(path)  # follows symlinks: two links to one file are one file
            identity: object = (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else path
        except OSError:
            info, identity = None, path
        if identity in first:
            other = first[identity]
            raise DataError(f"{os.path.join(root, 'images.txt')}, line {images[key][1]}: image "
                            f"{key} ({images[key][0]}) is the file of image {other} (line "
                            f"{images[other][1]}, {images[other][0]}): one image under two ids")
        first[identity] = key
        if _as_int(os.path.join(root, "train_test_split.txt"), key, split[key], {0, 1}) != wanted:
            continue
        label = _as_int(os.path.join(root, "image_class_labels.txt"), key, labels[key],
                        range(1, len(classes) + 1)) - 1
        if info is None or not stat.S_ISREG(info.st_mode):
            absent.append(path)
        samples.append((path, label))
    if absent:
        raise DataError(f"{len(absent)} image(s) listed in {os.path.join(root, 'images.txt')} "
                        f"are missing, e.g. {absent[0]}")
    if not samples:
        raise DataError(f"{os.path.join(root, 'train_test_split.txt')} puts no image in the "
                        f"{'training' if is_train else 'test'} split")
    return [classes[i][0] for i in sorted(classes)], samples


class CUBDataset(ImageFolderDataset):
    """The train or test split of a CUB_200_2011 folder, read from its list files (not from the
    folder names); ``classes``, ``targets`` and the handling of unreadable images are those of
    :class:`ImageFolderDataset`."""

    def __init__(self, root: str, is_train: bool, transform: Callable,
                 skip_bad_images: bool) -> None:
        self.is_train = is_train
        super().__init__(root, transform, skip_bad_images)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, self._split = read_cub_split(directory, self.is_train)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args, **kwargs
                     ) -> list[tuple[str, int]]:
        return self._split
