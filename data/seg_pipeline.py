"""Segmentation pipelines of the Swin/UPerNet ADE20K recipe, with numpy, PIL and torch.

Training: resize to a random ratio (RATIO_RANGE) of SCALE keeping the aspect ratio, random crop
CROP_SIZE where no class covers more than CAT_MAX_RATIO of the crop (up to 10 tries), horizontal
flip (p 0.5), photometric distortion, ImageNet normalisation, pad to CROP_SIZE (label pad =
ignore index). Testing: resize keeping the ratio to fit SCALE, normalise; the inference helpers
(models/seg_inference.py) pad to a multiple of 32. Multi-scale testing resizes the original image
to each ratio r of SCALE (mmseg's MultiScaleFlipAug: scale (int(2048 r), int(512 r)), then
imrescale keeping the ratio), one tensor per ratio.

Every random draw comes from the ``numpy.random.Generator`` passed in, which datasets seed from
(seed, epoch, index): a run is reproducible and resumes exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["item_rng", "rescale_size", "resize_pair", "random_crop", "photometric_distortion",
           "to_tensor", "pad_to", "SegTrainTransform", "multi_scale_ratios", "SegTestTransform"]


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item's random draws: a function of (seed, epoch, index) only."""
    return np.random.default_rng([seed, epoch, index])


def rescale_size(size: tuple[int, int], scale: Sequence[float]) -> tuple[int, int]:
    """(w, h) of an image of size (w, h) resized keeping its ratio to fit in ``scale`` (long
    side <= max(scale), short side <= min(scale)), as mmcv's rescale with keep_ratio."""
    w, h = size
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_pair(image: Image.Image, label: Image.Image | None, size: tuple[int, int]):
    """Image resized bilinearly, label by nearest neighbour, to (w, h) ``size``."""
    image = image.resize(size, Image.BILINEAR)
    return image, (label.resize(size, Image.NEAREST) if label is not None else None)


def random_crop(image: np.ndarray, label: np.ndarray, crop: Sequence[int], rng: np.random.Generator,
                cat_max_ratio: float = 0.75, ignore_index: int = 255, tries: int = 10):
    """An (h, w) ``crop`` of an HWC image and its HW label, re-drawn (up to ``tries`` times) while
    a single class covers more than ``cat_max_ratio`` of the crop's labelled pixels."""
    ch, cw = crop
    h, w = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(max(h - ch, 0) + 1)), int(rng.integers(max(w - cw, 0) + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            counts = np.bincount(label[y:y + ch, x:x + cw].ravel(), minlength=256)
            counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion of an HWC uint8 RGB image: brightness (+-32), contrast
    (x 0.5-1.5) before or after saturation (x 0.5-1.5) and hue (+-18 of 180), each with p 0.5.
    Returns float32 in 0..255."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = np.clip(img + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5

    def contrast(x: np.ndarray) -> np.ndarray:
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.random() < 0.5 else x

    if contrast_first:
        img = contrast(img)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV")).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if do_hue:  # PIL's hue spans 0..255 for OpenCV's 0..180
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256 / 180) % 256
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), np.float32)
    if not contrast_first:
        img = contrast(img)
    return img


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC 0..255 RGB -> CHW float32 normalised with the ImageNet mean / std."""
    mean = np.asarray(IMAGENET_DEFAULT_MEAN, np.float32) * 255
    std = np.asarray(IMAGENET_DEFAULT_STD, np.float32) * 255
    return torch.from_numpy(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())


def pad_to(x: torch.Tensor, size: Sequence[int], value: float) -> torch.Tensor:
    """Pad the last two dims of ``x`` at the bottom/right to at least ``size`` (h, w)."""
    ph, pw = max(size[0] - x.shape[-2], 0), max(size[1] - x.shape[-1], 0)
    return torch.nn.functional.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


class SegTrainTransform:
    """(PIL RGB image, PIL 'L'/'P' label with ignore already applied, rng) -> ((3, h, w) float
    tensor, (h, w) int64 label), (h, w) = ``crop_size``."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float],
                 crop_size: Sequence[int], cat_max_ratio: float = 0.75, hflip: float = 0.5,
                 photometric: bool = True, ignore_index: int = 255) -> None:
        self.scale, self.ratio_range, self.crop_size = scale, ratio_range, crop_size
        self.cat_max_ratio, self.hflip = cat_max_ratio, hflip
        self.photometric, self.ignore_index = photometric, ignore_index

    def __call__(self, image: Image.Image, label: Image.Image, rng: np.random.Generator):
        ratio = rng.uniform(*self.ratio_range)
        size = rescale_size(image.size, [s * ratio for s in self.scale])
        image, label = resize_pair(image, label, size)
        img, seg = random_crop(np.asarray(image), np.asarray(label), self.crop_size, rng,
                               self.cat_max_ratio, self.ignore_index)
        if rng.random() < self.hflip:
            img, seg = img[:, ::-1], seg[:, ::-1]
        img = photometric_distortion(np.ascontiguousarray(img), rng) if self.photometric else img
        x = pad_to(to_tensor(img), self.crop_size, 0.0)
        y = pad_to(torch.from_numpy(seg.astype(np.int64)), self.crop_size, self.ignore_index)
        return x, y


def multi_scale_ratios(seg) -> list[float] | None:
    """The ratios of SEG.SCALE at which validation images are prepared, from the config's SEG
    node: SEG.MS_RATIOS for TEST_MODE ms_flip, None (SEG.SCALE alone) otherwise."""
    return list(seg.MS_RATIOS) if seg.TEST_MODE == "ms_flip" else None


class SegTestTransform:
    """(PIL RGB image, PIL label) -> ((3, h', w') tensor resized to fit ``scale``, (H, W) int64
    label at the original size: metrics are computed at the original resolution).

    With ``ratios`` (multi-scale testing) the first item is a list: for each ratio r the original
    image resized to fit ``(int(scale[0] * r), int(scale[1] * r))`` as mmseg's MultiScaleFlipAug
    and mmcv's imrescale (keep ratio; new size ``int(w * f + 0.5) x int(h * f + 0.5)``), never
    an already resized image resized again."""

    def __init__(self, scale: Sequence[int], ratios: Sequence[float] | None = None) -> None:
        self.scale, self.ratios = scale, ratios

    def resized(self, image: Image.Image, scale: Sequence[int]) -> torch.Tensor:
        """``image`` resized bilinearly to fit ``scale``, normalised."""
        return to_tensor(np.asarray(image.resize(rescale_size(image.size, scale),
                                                 Image.BILINEAR)))

    def __call__(self, image: Image.Image, label: Image.Image, rng=None):
        target = torch.from_numpy(np.asarray(label).astype(np.int64))
        if self.ratios is None:
            return self.resized(image, self.scale), target
        return [self.resized(image, [int(s * r) for s in self.scale])
                for r in self.ratios], target
