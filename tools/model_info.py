"""Parameters and GFLOPs of a config's network.

    python tools/model_info.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml [--img-size 224]
    python tools/model_info.py --cfg configs/seg/upernet_mg_ssaf_t_512x512_160k_ade20k.yaml

A segmentation config (configs/seg/) counts the whole UPerNet (backbone, decode and auxiliary
heads) at 512x2048 by default, the size the field reports for ADE20K.

FLOPs are counted the way the field reports them, one multiply-add = one FLOP, with torch's
own counter (``torch.utils.flop_counter``) over one forward pass of a single image. The pass
runs SS-MSA in PyTorch ops (``separable.pytorch_ops``), whose products (AF's 3x3 convolution as
a dense product over the window) are those the field counts; the fused CPU kernels' own FLOP
formulas count the fewer products they do (a 9-tap stencil).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from data.build import is_seg_config  # noqa: E402
from models import build_model, separable  # noqa: E402
from models.upernet import build_segmentor  # noqa: E402


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> float:
    """Multiply-adds (in G) of one forward pass on a single image."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), separable.pytorch_ops(), counter:
        model.eval()(torch.zeros(1, in_chans, *img_size))
    return counter.get_total_flops() / 2e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", required=True, help="config file (YAML)")
    parser.add_argument("--img-size", type=int, nargs="+", default=None,
                        help="input size: N or H W (default: the config's DATA.IMG_SIZE; for a "
                        "segmentation config min(SEG.SCALE) x max(SEG.SCALE), 512x2048 for ADE20K)")
    parser.add_argument("--opts", nargs="+", default=[], help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    try:
        config = load_config(args.cfg, args.opts)
        seg = is_seg_config(config)
        model = build_segmentor(config) if seg else build_model(config)
        size = args.img_size or ([min(config.SEG.SCALE), max(config.SEG.SCALE)] if seg
                                 else [config.DATA.IMG_SIZE])
        size = (size[0], size[-1])
        if min(size) <= 0:
            raise ValueError(f"--img-size must be positive, got {size[0]}x{size[1]}")
        gmacs = count_gmacs(model, size, config.MODEL.MGSSAF.IN_CHANS)
    except ValueError as e:  # ConfigError and the model's input-size check included
        parser.exit(1, f"model_info.py: error: {e}\n")
    print(f"{config.MODEL.NAME}: {count_params(model) / 1e6:.2f} M parameters, "
          f"{gmacs:.2f} GFLOPs at {size[0]}x{size[1]}")


if __name__ == "__main__":
    main()
