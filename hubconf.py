"""torch.hub entry points for the released variants, from a local checkout:

    model = torch.hub.load("/path/to/this/repository", "mg_ssaf_t", source="local")
    model = torch.hub.load(repo, "mg_ssaf_s", source="local", checkpoint="mg_ssaf_small.pth",
                           num_classes=200)

Each is ``timm.create_model`` of the same name (any of its keyword arguments: ``num_classes``,
``features_only``, ``drop_path_rate``, ...). ``checkpoint`` is a local file read by the
project's safe loader (a released or project checkpoint); nothing is downloaded.
"""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

import models  # noqa: F401  (registers mg_ssaf_t / mg_ssaf_s / mg_ssaf_b with timm)

dependencies = ["torch", "timm", "yacs"]  # what models/ imports (no config, so no yaml)


def _create(name: str, checkpoint: str | None, **kwargs: Any) -> nn.Module:
    if checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    return timm.create_model(name, **kwargs)


def mg_ssaf_t(checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """MG-SSAF-T (19.6 M parameters with the 1000-class head)."""
    return _create("mg_ssaf_t", checkpoint, **kwargs)


def mg_ssaf_s(checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """MG-SSAF-S (32.5 M parameters with the 1000-class head)."""
    return _create("mg_ssaf_s", checkpoint, **kwargs)


def mg_ssaf_b(checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """MG-SSAF-B (55.9 M parameters with the 1000-class head)."""
    return _create("mg_ssaf_b", checkpoint, **kwargs)
