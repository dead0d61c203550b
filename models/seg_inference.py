"""Segmentation inference on whole images: single scale, sliding window, multi-scale + flip.

Every helper takes a segmentor in eval mode (``model(x)`` -> (B, K, h, w) logits at the input
size), a normalised (B, 3, h, w) batch and returns (B, K, H, W) class probabilities (softmax) at
``out_size`` (the label's size). Inputs are padded at the bottom/right to a multiple of 32 (what
MG-SSAF needs) and the padding cropped from the logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from .upernet import _resize

__all__ = ["whole_inference", "slide_inference", "ms_flip_inference", "inference"]


def _padded_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``x`` padded with zeros to a multiple of 32, cropped back to x's (h, w)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % 32, 0, -h % 32))
    return model(x)[..., :h, :w]


@torch.no_grad()
def whole_inference(model: nn.Module, x: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """The whole image at once."""
    return _resize(_padded_logits(model, x), out_size).softmax(1)


@torch.no_grad()
def slide_inference(model: nn.Module, x: torch.Tensor, out_size: Sequence[int],
                    crop: Sequence[int] = (512, 512),
                    stride: Sequence[int] = (341, 341)) -> torch.Tensor:
    """Windows of (h, w) ``crop`` every ``stride`` (the last flush with the border), logits
    averaged where windows overlap."""
    b, _, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    ys = list(range(0, h - ch, stride[0])) + [h - ch]
    xs = list(range(0, w - cw, stride[1])) + [w - cw]
    logits, count = None, x.new_zeros(1, 1, h, w)
    for y in ys:
        for x0 in xs:
            out = _padded_logits(model, x[..., y:y + ch, x0:x0 + cw])
            if logits is None:
                logits = x.new_zeros(b, out.shape[1], h, w)
            logits[..., y:y + ch, x0:x0 + cw] += out
            count[..., y:y + ch, x0:x0 + cw] += 1
    return _resize(logits / count, out_size).softmax(1)


@torch.no_grad()
def ms_flip_inference(model: nn.Module, x: torch.Tensor | Sequence[torch.Tensor],
                      out_size: Sequence[int],
                      ratios: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                      flip: bool = True, slide: dict | None = None) -> torch.Tensor:
    """Mean of the probabilities at each scale (and of its horizontal flip), each by
    ``slide_inference(**slide)`` when ``slide`` is given, else ``whole_inference``.

    ``x``: a list of batches, the original image resized to each scale by the data pipeline
    (``SegTestTransform`` with ratios: mmseg's MultiScaleFlipAug); ``ratios`` are then not used.
    Or one batch, an image already at its test scale (e.g. the digit scenes), resized here
    (bilinear) to each of ``ratios`` of its size."""
    if isinstance(x, torch.Tensor):
        h, w = x.shape[-2:]
        scales = [_resize(x, (int(h * r + 0.5), int(w * r + 0.5))) for r in ratios]
    else:
        scales = list(x)
    total = 0.0
    n = 0
    for xs in scales:
        for flipped in ((False, True) if flip else (False,)):
            xi = xs.flip(-1) if flipped else xs
            probs = (slide_inference(model, xi, out_size, **slide) if slide is not None
                     else whole_inference(model, xi, out_size))
            total = total + (probs.flip(-1) if flipped else probs)
            n += 1
    return total / n


def inference(model: nn.Module, x: torch.Tensor | Sequence[torch.Tensor],
              out_size: Sequence[int], seg: CfgNode) -> torch.Tensor:
    """Probabilities by the mode of ``seg.TEST_MODE`` ('whole', 'slide' or 'ms_flip'; ms_flip
    uses sliding windows when ``seg.MS_SLIDE``), with the windows/ratios of ``seg`` (config.SEG).
    ``x``: one batch, or for ms_flip the list of per-scale batches (see ms_flip_inference)."""
    slide = dict(crop=seg.SLIDE_CROP, stride=seg.SLIDE_STRIDE)
    if seg.TEST_MODE == "whole":
        return whole_inference(model, x, out_size)
    if seg.TEST_MODE == "slide":
        return slide_inference(model, x, out_size, **slide)
    if seg.TEST_MODE == "ms_flip":
        return ms_flip_inference(model, x, out_size, seg.MS_RATIOS, flip=True,
                                 slide=slide if seg.MS_SLIDE else None)
    raise ValueError(f"SEG.TEST_MODE {seg.TEST_MODE!r} is unknown: expected 'whole', 'slide' or "
                     "'ms_flip'")
