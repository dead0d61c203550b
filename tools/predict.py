"""Classify images with a trained model: the top-k classes of each image, with probabilities.

    python tools/predict.py --cfg configs/demo/MG-SSAF-nano-digits.yaml \\
        --checkpoint output/mg_ssaf_nano_digits/default/ckpt_best.pth digit0.png digit7.png
    python tools/predict.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml --checkpoint mg_ssaf_tiny.pth \\
        photos/ --csv photos.csv

Arguments are image files or folders (every image below a folder, in sorted order); they go
before ``--opts``, which takes every argument after it (or after a ``--`` that ends the
overrides). Each image goes through the config's evaluation transform (DATA.IMG_SIZE, TEST.CROP,
DATA.INTERPOLATION).
For every image it prints its path and ``--topk`` lines ``probability  class``; with a folder
among the arguments, or ``--csv``, it also writes one CSV row per image
(``image,class_1,prob_1,...``; default file ``predictions.csv``).

Class names: those the checkpoint stores (``class_names``: training saves the dataset's, e.g.
the ImageFolder folder names or CUB's class names); else, for a 1,000-class head, ImageNet-1K's
(from timm); else the class indices.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from data.build import build_transform  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint_io import CheckpointError, load_model_weights  # noqa: E402


def image_paths(inputs: Sequence[str]) -> list[str]:
    """The image files named or found (recursively, sorted) in the folders named."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(item)
                           for name in names if name.lower().endswith(IMG_EXTENSIONS))
            if not found:
                raise SystemExit(f"error: {item}: no images ({', '.join(IMG_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f"error: {item}: no such file or folder")
    return paths


def class_names(checkpoint: dict[str, Any], num_classes: int) -> list[str]:
    """The checkpoint's class names, ImageNet-1K's for a 1,000-class head, else the indices."""
    names = checkpoint.get("class_names")
    if names is not None:
        if len(names) != num_classes:
            raise SystemExit(f"error: the checkpoint names {len(names)} classes, its head has "
                             f"{num_classes}")
        return [str(name) for name in names]
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def batches(paths: list[str], transform: Any, size: int) -> Iterator[tuple[list[str],
                                                                          torch.Tensor]]:
    for start in range(0, len(paths), size):
        chunk = paths[start:start + size]
        images = []
        for path in chunk:
            try:
                with Image.open(path) as image:
                    images.append(transform(image.convert("RGB")))
            except OSError as e:
                raise SystemExit(f"error: {path}: cannot read the image ({e})") from None
        yield chunk, torch.stack(images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [-h] --cfg CFG --checkpoint CHECKPOINT [options] IMAGE [IMAGE ...] "
              "[--opts KEY VALUE ...]")
    # "*" rather than "+": images after --opts (which takes them) get the error below, not
    # argparse's "the following arguments are required"
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files or folders of images, before --opts")
    parser.add_argument("--cfg", required=True, help="the model's config (YAML)")
    parser.add_argument("--checkpoint", required=True,
                        help="weights: a training or released checkpoint")
    parser.add_argument("--topk", type=int, default=5,
                        help="classes printed per image (default: 5)")
    parser.add_argument("--csv", help="write the predictions to this CSV file (default with a "
                        "folder argument: predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides, last: --opts takes every argument after it, so "
                        "the images go before it (or after a -- that ends the overrides)")
    args = parser.parse_args(argv)
    if not args.images:
        parser.error("no images given: put the image files or folders before --opts, which takes "
                     "every argument after it (or end the overrides with --)" if args.opts
                     else "no images given: name image files or folders")
    # a key is never a path: from the first key that is one on, every path is a stray image
    first = next((i for i in range(0, len(args.opts), 2) if os.path.exists(args.opts[i])), None)
    strays = [] if first is None else [a for a in args.opts[first:] if os.path.exists(a)]
    if strays:
        parser.error(f"--opts took {', '.join(strays)} as config overrides: put every image "
                     "before --opts, which takes every argument after it (or end the overrides "
                     "with --)")

    try:
        config = load_config(args.cfg, args.opts)
        paths = image_paths(args.images)
        model = build_model(config)
        checkpoint = load_model_weights(model, args.checkpoint)
    except (CheckpointError, ValueError, RuntimeError) as e:  # ConfigError is a ValueError
        parser.exit(1, f"predict.py: error: {(str(e).splitlines() or [''])[0]}\n")
    model.to(args.device).eval()
    if model.num_classes < 1:
        raise SystemExit("error: the model has no classifier (MODEL.NUM_CLASSES 0)")
    names = class_names(checkpoint, model.num_classes)
    k = min(args.topk, model.num_classes)
    csv_path = args.csv or ("predictions.csv" if any(map(os.path.isdir, args.images)) else None)
    rows = []
    with torch.inference_mode():
        for chunk, images in batches(paths, build_transform(False, config), args.batch_size):
            probs = model(images.to(args.device)).float().softmax(-1).cpu()
            top = probs.topk(k, dim=-1)
            for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
                print(path)
                for p, i in zip(values, indices):
                    print(f"  {p:.4f}  {names[i]}")
                rows.append([path, *(x for p, i in zip(values, indices)
                                     for x in (names[i], f"{p:.6f}"))])
    if csv_path:
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *(f"{col}_{r}" for r in range(1, k + 1)
                                        for col in ("class", "prob"))])
            writer.writerows(rows)
        print(f"wrote {len(rows)} predictions to {csv_path}")


if __name__ == "__main__":
    main()
