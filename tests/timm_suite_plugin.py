"""pytest plugin (``-p timm_suite_plugin``) that points timm's own ``tests/test_models.py`` at the
MG-SSAF models, as timm runs that file on its zoo (tests/test_timm_suite.py starts it).

* ``import models`` registers ``mg_ssaf_t/s/b`` with timm before the file is collected.
* timm's file selects the models of its ``forward_intermediates`` / ``features_only`` tests with
  ``list_models(module=FEAT_INTER_FILTERS)``; the module that registers ours (``registry``) is
  appended to that very list the first time the file passes it in.
* ``$MGSSAF_TIMM_MODELS`` (comma-separated, default all three) restricts every model list the
  file builds to those names, so collection does not parametrise over timm's whole zoo. Tests
  with fixed timm model names are deselected by ``-k`` on the command line.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import sys
from typing import Any

import timm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402,F401  (registers mg_ssaf_t/s/b)

REGISTERING_MODULE = models.registry.__name__.rsplit(".", 1)[-1]
SELECTED = [name for name in os.environ.get("MGSSAF_TIMM_MODELS", "mg_ssaf_*").split(",") if name]
_FEAT_INTER_MARKER = "swin_transformer"  # a module every FEAT_INTER_FILTERS of timm 1.x lists

_list_models = timm.list_models


@functools.wraps(_list_models)
def _our_models(*args: Any, module: Any = "", **kwargs: Any) -> list[str]:
    if isinstance(module, list) and _FEAT_INTER_MARKER in module \
            and REGISTERING_MODULE not in module:
        module.append(REGISTERING_MODULE)  # timm's FEAT_INTER_FILTERS, extended in place
    names = _list_models(*args, module=module, **kwargs)
    return [n for n in names if any(fnmatch.fnmatch(n.split(".")[0], p) for p in SELECTED)]


timm.list_models = _our_models
timm.models.list_models = _our_models
