"""The optimizer of a run: AdamW (default) or SGD, with no weight decay on biases, norms and
other 1-D parameters (Swin's ``set_weight_decay``, for classification), and optionally layer-wise
LR decay (TRAIN.LAYER_DECAY). Segmentation (main_seg.py) passes its own groups instead:
:func:`keyword_decay_groups`, the mmseg recipe's ``paramwise_cfg``."""
from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay
from torch import nn
from yacs.config import CfgNode as CN

from config import ConfigError


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay: biases, norms and 1-D parameters, plus any the model names
    in ``no_weight_decay()`` / ``no_weight_decay_keywords()``."""
    skip = getattr(model, "no_weight_decay", set)()
    keywords = getattr(model, "no_weight_decay_keywords", set)()
    return {name for name, param in model.named_parameters()
            if param.ndim <= 1 or name.endswith(".bias") or name in skip
            or any(k in name for k in keywords)}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: parameters with ``weight_decay``, and those of :func:`no_weight_decay_names`
    without."""
    no_decay = no_weight_decay_names(model)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for name, p in params if name not in no_decay],
             "weight_decay": weight_decay},
            {"params": [p for name, p in params if name in no_decay], "weight_decay": 0.0}]


# The Swin ADE20K recipe's paramwise_cfg custom_keys with decay_mult 0 (mmcv matches them as
# substrings of the full parameter name). In MG-SSAF "norm" matches every LayerNorm (the stem's,
# each block's norm1 and mlp.norm, each PatchMerging's, the segmentation backbone's norm0..norm3);
# MG-SSAF has no relative position bias table and no absolute position embedding, so the other
# two keys match nothing.
SEG_NO_DECAY_KEYWORDS = ("norm", "relative_position_bias_table", "absolute_pos_embed")


def keyword_decay_groups(model: nn.Module, weight_decay: float,
                         keywords: tuple[str, ...] = SEG_NO_DECAY_KEYWORDS) -> list[dict]:
    """Two groups as mmcv's ``paramwise_cfg=dict(custom_keys={k: dict(decay_mult=0.)})``:
    parameters whose name contains one of ``keywords`` without weight decay, every other one
    (biases and BatchNorm parameters included) with ``weight_decay``."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    skip = {name for name, _ in params if any(k in name for k in keywords)}
    return [{"params": [p for name, p in params if name not in skip],
             "weight_decay": weight_decay},
            {"params": [p for name, p in params if name in skip], "weight_decay": 0.0}]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise LR decay groups over ``model.group_matcher()``: each carries an
    ``lr_scale`` that the LR scheduler applies; the weight decay follows :func:`parameter_groups`
    (none on :func:`no_weight_decay_names`). Groups come in order of decreasing
    ``lr_scale``, so ``param_groups[0]`` (the one logged) runs at the scheduled LR."""
    if not hasattr(model, "group_matcher"):
        raise ConfigError(f"TRAIN.LAYER_DECAY needs a model with group_matcher(); "
                          f"{type(model).__name__} has none")
    groups = param_groups_layer_decay(model, weight_decay,
                                      no_weight_decay_list=sorted(no_weight_decay_names(model)),
                                      layer_decay=layer_decay)
    return sorted(groups, key=lambda g: -g["lr_scale"])


def build_optimizer(config: CN, model: nn.Module,
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """``TRAIN.OPTIMIZER.NAME`` ('adamw' or 'sgd') at ``TRAIN.BASE_LR`` (already scaled to the
    total batch, see ``lr_scheduler.scale_lrs``) over ``groups``, by default those of
    :func:`parameter_groups`, or with layer-wise LR decay when ``TRAIN.LAYER_DECAY`` < 1."""
    opt = config.TRAIN.OPTIMIZER
    layer_decay = config.TRAIN.LAYER_DECAY
    if groups is not None:
        pass
    elif layer_decay < 1.0:
        groups = layer_decay_groups(model, config.TRAIN.WEIGHT_DECAY, layer_decay)
    else:
        groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY)
    name = opt.NAME.lower()
    if name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, betas=tuple(opt.BETAS),
                                      eps=opt.EPS)
    elif name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM,
                                    nesterov=True)
    else:
        raise ConfigError(f"TRAIN.OPTIMIZER.NAME {opt.NAME!r} is unknown: expected 'adamw' or "
                          "'sgd'")
    for group in optimizer.param_groups:
        # timm's schedulers scale each update by lr_scale from the unscaled "initial_lr": the
        # steps before the first update run at the scaled LR too
        group["initial_lr"] = group["lr"]
        group["lr"] *= group.get("lr_scale", 1.0)
    return optimizer
