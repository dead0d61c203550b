"""The optimizer of a run: AdamW (default) or SGD, with no weight decay on biases, norms and
other 1-D parameters."""
from __future__ import annotations

import torch
from torch import nn
from yacs.config import CfgNode as CN

from config import ConfigError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: parameters with ``weight_decay``, and biases, norms and 1-D parameters (plus
    any the model names in ``no_weight_decay()`` / ``no_weight_decay_keywords()``) without."""
    skip = getattr(model, "no_weight_decay", set)()
    keywords = getattr(model, "no_weight_decay_keywords", set)()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.ndim <= 1 or name.endswith(".bias") or name in skip
                or any(k in name for k in keywords)):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config: CN, model: nn.Module) -> torch.optim.Optimizer:
    """``TRAIN.OPTIMIZER.NAME`` ('adamw' or 'sgd') at ``TRAIN.BASE_LR`` (already scaled to the
    total batch, see ``lr_scheduler.scale_lrs``)."""
    opt = config.TRAIN.OPTIMIZER
    groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY)
    name = opt.NAME.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, betas=tuple(opt.BETAS),
                                 eps=opt.EPS)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM,
                               nesterov=True)
    raise ConfigError(f"TRAIN.OPTIMIZER.NAME {opt.NAME!r} is unknown: expected 'adamw' or 'sgd'")
