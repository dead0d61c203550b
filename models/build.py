"""Config -> network: the one construction path of ``build_model`` and the timm entry points."""
from __future__ import annotations

from typing import Any

from yacs.config import CfgNode

from .mg_ssaf import MGSSAF


def model_kwargs(config: CfgNode) -> dict[str, Any]:
    """The ``MGSSAF`` arguments of the ``MODEL.*``, ``DATA.IMG_SIZE`` and
    ``TRAIN.USE_CHECKPOINT`` keys (see config.py)."""
    model_type = config.MODEL.TYPE
    if model_type != "mg_ssaf":
        raise ValueError(f"MODEL.TYPE {model_type!r} is not supported (expected 'mg_ssaf')")
    arch = config.MODEL.MGSSAF
    return dict(
        img_size=config.DATA.IMG_SIZE,
        in_chans=arch.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=arch.EMBED_DIM,
        depths=arch.DEPTHS,
        num_heads=arch.NUM_HEADS,
        global_ratio=arch.GLOBAL_RATIO,
        strip_width=arch.STRIP_WIDTH,
        window_size=arch.WINDOW_SIZE,
        mlp_ratio=arch.MLP_RATIO,
        qkv_bias=arch.QKV_BIAS,
        head_hidden_dim=arch.HEAD_HIDDEN_DIM,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        local_attention=arch.LOCAL_ATTENTION,
    )


def build_model(config: CfgNode) -> MGSSAF:
    """The network named by ``config.MODEL.TYPE``, built from the ``MODEL.*`` and ``DATA.IMG_SIZE``
    keys (see config.py)."""
    return MGSSAF(**model_kwargs(config))
