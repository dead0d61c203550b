"""Model zoo of this repository: ``build_model(config)`` turns a config into a network.

Importing this package also registers ``mg_ssaf_t``, ``mg_ssaf_s`` and ``mg_ssaf_b`` with timm
(``timm.create_model``; see models/mg_ssaf.py)."""
from torch import nn
from yacs.config import CfgNode

from .mg_ssaf import MGSSAF, checkpoint_filter_fn

__all__ = ["MGSSAF", "build_model", "checkpoint_filter_fn"]


def build_model(config: CfgNode) -> nn.Module:
    """The network named by ``config.MODEL.TYPE``, built from the ``MODEL.*`` and ``DATA.IMG_SIZE``
    keys (see config.py)."""
    model_type = config.MODEL.TYPE
    if model_type != "mg_ssaf":
        raise ValueError(f"MODEL.TYPE {model_type!r} is not supported (expected 'mg_ssaf')")
    arch = config.MODEL.MGSSAF
    return MGSSAF(
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
    )
