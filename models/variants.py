"""The released MG-SSAF variants, the one table of their architectures.

``VARIANTS`` maps a MODEL.NAME to ``(title, architecture, drop-path rate)``: the architecture as
the MODEL.MGSSAF keys of config.py, and MODEL.DROP_PATH_RATE, which fills in when unset but may be
changed (e.g. for fine-tuning). config.py fills a variant's keys from it (and checks how its name
is spelled), models/registry.py builds timm's ``mg_ssaf_t/s/b`` from it, and
models/checkpoint_io.py names the variant of a checkpoint that does not fit.
"""
from __future__ import annotations

from typing import Any

__all__ = ["RELEASED_NAMES", "VARIANTS", "variant_kwargs"]

_T_LIKE = dict(EMBED_DIM=96, NUM_HEADS=[3, 6, 12, 24], GLOBAL_RATIO=[0.0, 0.5, 0.5, 0.0])
_COMMON = dict(STRIP_WIDTH=[0, 2, 2, 0], WINDOW_SIZE=7, MLP_RATIO=2.0, QKV_BIAS=True,
               HEAD_HIDDEN_DIM=1280)
VARIANTS: dict[str, tuple[str, dict[str, Any], float]] = {
    "mg_ssaf_tiny": ("MG-SSAF-T", dict(_T_LIKE, DEPTHS=[2, 2, 6, 2], **_COMMON), 0.2),
    "mg_ssaf_small": ("MG-SSAF-S", dict(_T_LIKE, DEPTHS=[2, 2, 18, 2], **_COMMON), 0.2),
    "mg_ssaf_base": ("MG-SSAF-B", dict(EMBED_DIM=128, DEPTHS=[2, 2, 18, 2],
                                       NUM_HEADS=[4, 8, 16, 32],
                                       GLOBAL_RATIO=[0.0, 0.75, 0.75, 0.0], **_COMMON), 0.3),
}
# The released repository's MODEL.NAME spellings (its configs/MG-SSAF/*.yaml): the titles.
RELEASED_NAMES = {title: name for name, (title, _, _) in VARIANTS.items()}


def variant_kwargs(name: str) -> dict[str, Any]:
    """The ``MGSSAF`` arguments of the released variant ``name`` (a VARIANTS key) with the other
    settings at config.py's defaults: 224 x 224 RGB input, 1000 classes, no dropout, the
    variant's drop-path rate, no activation checkpointing, SS-MSA in eager PyTorch ops where
    the CPU kernels do not apply (``local_attention="ops"``). The same arguments as
    ``model_kwargs`` of a config that sets only MODEL.NAME (tests/test_backbone.py checks)."""
    _, arch, drop_path_rate = VARIANTS[name]
    return dict(
        img_size=224, in_chans=3, num_classes=1000,
        embed_dim=arch["EMBED_DIM"], depths=list(arch["DEPTHS"]),
        num_heads=list(arch["NUM_HEADS"]), global_ratio=list(arch["GLOBAL_RATIO"]),
        strip_width=list(arch["STRIP_WIDTH"]), window_size=arch["WINDOW_SIZE"],
        mlp_ratio=arch["MLP_RATIO"], qkv_bias=arch["QKV_BIAS"],
        head_hidden_dim=arch["HEAD_HIDDEN_DIM"], drop_rate=0.0, drop_path_rate=drop_path_rate,
        use_checkpoint=False, local_attention="ops",
    )
