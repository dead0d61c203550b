"""timm registration: ``import models`` makes ``timm.create_model("mg_ssaf_t" | "mg_ssaf_s" |
"mg_ssaf_b", ...)`` build the released MG-SSAF-T/S/B, each from its row of the variant table
(models/variants.py, the architecture of MODEL.NAME mg_ssaf_tiny/small/base) through
:func:`variant_kwargs`: the arguments ``build_model`` gives a config naming that variant. Weights
come only from local files: no URL, no hub, nothing is downloaded."""
from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .checkpoint_io import model_state_dict
from .mg_ssaf import MGSSAF
from .variants import variant_kwargs

__all__ = ["checkpoint_filter_fn"]


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """A released or project checkpoint (``{"model": weights, "config": ..., ...}``) or a bare
    state dict -> the model's state dict (``module.`` / ``_orig_mod.`` prefixes removed)."""
    return model_state_dict(state_dict)


# timm names -> MODEL.NAME of the released variants (models/variants.py holds their architectures)
_CONFIG_NAMES = {"mg_ssaf_t": "mg_ssaf_tiny", "mg_ssaf_s": "mg_ssaf_small",
                 "mg_ssaf_b": "mg_ssaf_base"}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """No URL or hub id: weights come only from a local file, given as
    ``pretrained_cfg_overlay=dict(file=path)``, or a state dict, ``dict(state_dict=...)``."""
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="patch_embed.Conv2Down", classifier="head", **kwargs)


default_cfgs = generate_default_cfgs({f"{name}.in1k": _cfg() for name in _CONFIG_NAMES})


def _create_mg_ssaf(variant: str, pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """``variant``'s network (kwargs override the arguments its table row gives) through timm's
    builder; with ``features_only=True`` a FeatureGetterNet over
    :meth:`MGSSAF.forward_intermediates`.

    A local checkpoint is read by :meth:`MGSSAF.load_pretrained` (timm's ``custom_load``):
    timm's own reader loads with ``weights_only`` and refuses the yacs config that project and
    released checkpoints hold. A ``.safetensors`` file (tools/export.py) is read by timm."""
    args = dict(variant_kwargs(_CONFIG_NAMES[variant]), **kwargs)
    out_indices = args.pop("out_indices", tuple(range(len(args["depths"]))))
    overlay = dict(args.pop("pretrained_cfg_overlay", None) or {})
    if overlay.get("file"):  # timm reads safetensors files itself; checkpoints are pickles
        overlay.setdefault("custom_load", not str(overlay["file"]).endswith(".safetensors"))
    return build_model_with_cfg(
        MGSSAF, variant, pretrained, pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **args)


# Every MGSSAF argument is a keyword of the entry points: e.g. timm.create_model("mg_ssaf_t",
# local_attention="compiled") runs SS-MSA + AF through torch.compile on CUDA (see MGSSAF).
@register_model
def mg_ssaf_t(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-T (19.6 M parameters with the 1000-class head)."""
    return _create_mg_ssaf("mg_ssaf_t", pretrained, **kwargs)


@register_model
def mg_ssaf_s(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-S (32.5 M parameters with the 1000-class head)."""
    return _create_mg_ssaf("mg_ssaf_s", pretrained, **kwargs)


@register_model
def mg_ssaf_b(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-B (55.9 M parameters with the 1000-class head)."""
    return _create_mg_ssaf("mg_ssaf_b", pretrained, **kwargs)
