"""Colour overlays of segmentation predictions next to the ground truth, as PNGs.

    python tools/seg_overlay.py --cfg configs/seg/upernet_mg_ssaf_t_512x512_160k_ade20k.yaml \\
        --checkpoint output/.../ckpt.pth --images a.jpg b.jpg [--labels a.png b.png] --out overlays
    python tools/seg_overlay.py --cfg configs/seg/upernet_mg_ssaf_nano_digits.yaml \\
        --checkpoint output/.../ckpt.pth --digits 0 1 2 --out overlays

Each PNG is [image | ground truth over the image | prediction over the image] (the ground truth
panel is left out without labels). ADE20K labels are read with reduce_zero_label; ``--digits``
takes scenes of the digits validation set by index. The palette is generated (see ``palette``).
"""
from __future__ import annotations

import argparse
import colorsys
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from data.ade20k import load_pair  # noqa: E402
from data.common import DataError, load_rgb_image  # noqa: E402
from data.seg_pipeline import SegTestTransform, multi_scale_ratios  # noqa: E402
from models.checkpoint_io import CheckpointError, load_checkpoint_file, load_weights  # noqa: E402
from models.seg_inference import inference  # noqa: E402
from models.upernet import build_segmentor  # noqa: E402


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: hues a golden angle apart, saturation and value cycling
    through three levels, so neighbouring class indices differ clearly. Deterministic."""
    colours = []
    for k in range(num_classes):
        hue = (k * 0.618033988749895) % 1.0
        sat, val = (0.9, 0.65, 0.45)[k % 3], (0.95, 0.75, 0.9)[(k // 3) % 3]
        colours.append([round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(colours, np.uint8)


def overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray,
            alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """HxWx3 uint8 ``image`` blended with the colours of the HxW ``label`` (ignored pixels and
    labels beyond the palette left as they are)."""
    out = image.astype(np.float32)
    known = (label != ignore_index) & (label < len(colours))
    out[known] = (1 - alpha) * out[known] + alpha * colours[label[known]]
    return out.round().astype(np.uint8)


def panel(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None,
          colours: np.ndarray) -> Image.Image:
    """[image | ground truth overlay | prediction overlay] side by side."""
    parts = [image] + ([overlay(image, label, colours)] if label is not None else [])
    return Image.fromarray(np.concatenate(parts + [overlay(image, pred, colours)], axis=1))


def load_segmentor(cfg_path: str, checkpoint: str, opts=()) -> tuple[torch.nn.Module, object]:
    """The segmentor of ``cfg_path`` with the weights of ``checkpoint``, read by the project's
    safe loader (models.checkpoint_io.load_checkpoint_file: no pickled code runs, the checksum
    is verified)."""
    config = load_config(cfg_path, opts)
    model = build_segmentor(config)
    load_weights(model, load_checkpoint_file(checkpoint), checkpoint)
    return model.eval(), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", required=True, help="segmentation config (YAML)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint of main_seg.py")
    parser.add_argument("--images", nargs="+", default=[], help="RGB images")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="their ADE20K annotations (PNG), in the same order")
    parser.add_argument("--digits", type=int, nargs="+", default=[],
                        help="indices of digits validation scenes (the CPU demo)")
    parser.add_argument("--out", default="overlays", help="output folder")
    parser.add_argument("--opts", nargs="+", default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    if args.labels is not None and len(args.labels) != len(args.images):
        parser.error(f"--labels gives {len(args.labels)} files for {len(args.images)} --images")
    try:
        model, config = load_segmentor(args.cfg, args.checkpoint, args.opts)
    except (CheckpointError, ValueError) as e:  # config.ConfigError is a ValueError
        parser.exit(1, f"seg_overlay.py: error: {e}\n")
    colours = palette(config.MODEL.NUM_CLASSES)
    os.makedirs(args.out, exist_ok=True)
    items = []  # (name, HxWx3 uint8 image, normalised tensor, HxW label or None)
    transform = SegTestTransform(config.SEG.SCALE, multi_scale_ratios(config.SEG))
    for i, path in enumerate(args.images):
        try:
            image, label = (load_pair(path, args.labels[i]) if args.labels
                            else (load_rgb_image(path), None))
        except DataError as e:  # unreadable, or a label map that does not fit its image
            parser.exit(1, f"seg_overlay.py: error: {e}\n")
        x, _ = transform(image, Image.new("L", image.size))
        items.append((os.path.splitext(os.path.basename(path))[0], np.asarray(image), x,
                      None if label is None else np.asarray(label)))
    if args.digits:
        from data.digits_seg import DigitsSegDataset
        val = DigitsSegDataset(is_train=False)
        for k in args.digits:
            image, label = val.scene(k)
            items.append((f"digits_val_{k}", image, val[k][0], label))
    for name, image, x, label in items:
        batch = [t[None] for t in x] if isinstance(x, list) else x[None]
        probs = inference(model, batch, image.shape[:2], config.SEG)
        pred = probs.argmax(1)[0].numpy().astype(np.uint8)
        path = os.path.join(args.out, name + "_overlay.png")
        panel(image, pred, label, colours).save(path)
        print(path)


if __name__ == "__main__":
    main()
