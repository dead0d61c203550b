"""What every dataset of data/ shares: the data errors, image loading that names a file it cannot
read, and the class-folder dataset (data/build.py's ImageNet layout, data/cub.py's images)."""
from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Callable, TypeVar

import torch
import torch.utils.data
from PIL import Image
from torchvision import datasets

# How loader workers start: forked from a single-threaded server process ("forkserver", Python
# 3.14's default on Linux), never from the training process itself. That process runs threads
# (gloo's and NCCL's, which take Python's interpreter lock to free tensors when a collective ends;
# the pin-memory thread), and a fork at such a moment leaves the worker deadlocked before its first
# line on Python <= 3.11 (cpython#112275): the run hangs. Spawn where there is no forkserver. The
# server imports torch, torchvision and timm once (not this repository's modules: its sys.path
# starts with the caller's working directory, whose data/ may be another package); each worker
# forked from it imports ours and runs the entry script again (as __mp_main__, as
# multiprocessing does), and gets its dataset pickled.
WORKER_CONTEXT = multiprocessing.get_context(
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
if WORKER_CONTEXT.get_start_method() == "forkserver":
    WORKER_CONTEXT.set_forkserver_preload(["torch", "torchvision", "timm"])
T = TypeVar("T")
SKIP_SLOTS = 257  # the training process and up to 256 loader workers count skipped images apart


class DataError(ValueError):
    """A data folder, image or data setting that cannot be used."""


class BadImageError(DataError):
    """An image file that cannot be read or decoded."""


# What opening or decoding an image file may raise: a missing or truncated file, one PIL cannot
# identify, a corrupt stream, an image too large to be safe.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb_image(path: str) -> Image.Image:
    """Opens an image file as RGB; a file that cannot be decoded raises BadImageError naming it."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except DECODE_ERRORS as e:
        raise BadImageError(f"cannot read image {path}: {e}") from None


class SkippedImages:
    """``DATA.SKIP_BAD_IMAGES`` for one dataset. :meth:`first_readable` loads item ``index``;
    where its file cannot be read (BadImageError), it stops the run, or with ``enabled`` loads
    the next readable item instead, with a warning, and counts the skip (see :meth:`pop`)."""

    def __init__(self, enabled: bool, root: str) -> None:
        self.enabled, self.root = enabled, root
        # Skips counted in shared memory, a slot per process (this one, then each loader worker),
        # so that no lock is needed (and no semaphore, whose cleanup process the stop signals
        # would reach, see data.build.Loader).
        self._counts = torch.zeros(SKIP_SLOTS, dtype=torch.int64).share_memory_()

    def first_readable(self, load: Callable[[int], T], index: int, length: int) -> T:
        """``load(index)``, or with skipping the first of ``load(index + 1)``, ... (wrapping
        around the ``length`` items) that reads."""
        for offset in range(length):
            try:
                return load((index + offset) % length)
            except BadImageError as e:
                if not self.enabled:
                    raise
                logging.getLogger("mg_ssaf").warning(f"{e}: skipped (DATA.SKIP_BAD_IMAGES)")
                worker = torch.utils.data.get_worker_info()
                self._counts[0 if worker is None else 1 + worker.id % (SKIP_SLOTS - 1)] += 1
        raise DataError(f"{self.root}: none of its images can be read")

    def pop(self) -> int:
        """Items skipped since the last call (made between epochs, while no worker loads)."""
        count = int(self._counts.sum())
        self._counts.zero_()
        return count


class ImageFolderDataset(datasets.ImageFolder):
    """An ImageFolder (``<root>/<class>/<image>``) that names unreadable images. With
    ``skip_bad_images`` such an image is replaced by the next readable one, with a warning, and
    counted (see :meth:`pop_skipped`)."""

    def __init__(self, root: str, transform: Callable, skip_bad_images: bool) -> None:
        try:
            super().__init__(root, transform=transform, loader=load_rgb_image)
        except FileNotFoundError as e:
            raise DataError(f"{root}: {e}") from None
        self.skips = SkippedImages(skip_bad_images, root)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.skips.first_readable(super().__getitem__, index, len(self.samples))

    def pop_skipped(self) -> int:
        """Images skipped since the last call (made between epochs, while no worker loads)."""
        return self.skips.pop()
