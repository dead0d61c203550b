"""Model zoo of this repository: ``build_model(config)`` turns a config into a network.

Importing this package also registers ``mg_ssaf_t``, ``mg_ssaf_s`` and ``mg_ssaf_b`` with timm
(``timm.create_model``; see models/registry.py)."""
from .build import build_model, model_kwargs
from .mg_ssaf import MGSSAF
from .registry import checkpoint_filter_fn

__all__ = ["MGSSAF", "build_model", "checkpoint_filter_fn", "model_kwargs"]
