"""Imports go one way: ``models/`` needs nothing of the training side, and no module of the
repository imports itself back through a chain of imports (a cycle)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The training side: what models/ must not import (engine/ may appear later).
TRAINING_SIDE = ("config", "utils", "data", "main", "main_seg", "startup", "logger", "engine",
                 "lr_scheduler", "optimizer", "seg_metrics", "tools")
_SKIP_DIRS = {"__pycache__", "configs", "shared"}

_IMPORT_MODELS = """
import json, os, pkgutil, sys, importlib
import models
for info in pkgutil.iter_modules(models.__path__, "models."):
    importlib.import_module(info.name)
import timm
timm.create_model("mg_ssaf_t", num_classes=0)
print(json.dumps({name: getattr(module, "__file__", None)
                  for name, module in list(sys.modules.items())}))
"""


def _in_environment(relative: str) -> bool:
    """Whether a path below the checkout lies in a hidden folder (``.venv-ci``) or an installed
    package tree rather than in the repository's own code."""
    parts = relative.split(os.sep)
    return parts[0].startswith(".") or "site-packages" in parts


def test_models_imports_nothing_of_the_training_side() -> None:
    """``import models`` (every submodule, and a timm build) in a fresh interpreter loads no
    module of the repository outside models/."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _IMPORT_MODELS], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    named = sorted(n for n in loaded if n.split(".")[0] in TRAINING_SIDE)
    models_dir = os.path.join(ROOT, "models") + os.sep
    # (some of torch's modules have a bare file name as __file__: only real paths count; a
    # virtual environment inside the checkout, as .ci/run makes, holds no module of ours)
    own = sorted(n for n, f in loaded.items() if f and os.path.isabs(f)
                 and f.startswith(ROOT + os.sep) and not f.startswith(models_dir)
                 and not _in_environment(os.path.relpath(f, ROOT)))
    assert not named and not own, f"importing models loads the training side: {named or own}"


def _module_name(path: str) -> str:
    """``models/mg_ssaf.py`` -> ``models.mg_ssaf``; ``data/__init__.py`` -> ``data``."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def repository_modules() -> dict[str, str]:
    """Every .py file of the repository (hidden folders, configs and caches left out), by module
    name."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[_module_name(path)] = path
    return found


def _package(module: str, path: str) -> str:
    """The package a module's relative imports start from."""
    return module if path.endswith("__init__.py") else module.rpartition(".")[0]


def _imported_names(module: str, path: str) -> set[str]:
    """The dotted names a module's import statements (anywhere in it) can load; relative imports
    resolved."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package(module, path).split(".")
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(p for p in [*package, base] if p)
            names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return names


def _resolve(name: str, importer: str, modules: dict[str, str]) -> set[str]:
    """The repository modules that importing ``name`` from ``importer`` runs: the module and the
    packages above it, less the importer's own packages. A name that is not at the root may be
    a sibling of a script (tools/ and tests/ put their own folder on sys.path)."""
    own = importer.split(".")
    ancestors = {".".join(own[:i]) for i in range(1, len(own) + 1)}
    folder = importer if modules[importer].endswith("__init__.py") else ".".join(own[:-1])
    for base in ("", folder):
        parts = [p for p in [base, *name.split(".")] if p]
        first = len(base.split(".")) if base else 0
        if ".".join(parts[:first + 1]) not in modules:
            continue
        chain = {".".join(parts[:i]) for i in range(first + 1, len(parts) + 1)}
        return (chain & modules.keys()) - ancestors
    return set()


def import_graph() -> dict[str, set[str]]:
    """Module -> the repository modules it imports (top-level and function-level imports)."""
    modules = repository_modules()
    return {module: set().union(*[_resolve(n, module, modules)
                                  for n in _imported_names(module, path)])
            for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_resolves_relative_and_function_level_imports() -> None:
    graph = import_graph()
    assert "models.mg_ssaf" in graph["models"]        # from .mg_ssaf import (a package's own)
    assert "data.digits" in graph["data.build"]       # from .digits import, inside a function
    assert "tests.helpers" in graph["tests.conftest"]  # a sibling of the tests folder


def test_no_import_cycle() -> None:
    """No module of the repository imports itself through a chain of imports."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_import_graph_stays_inside_models() -> None:
    """What the AST says, besides what the interpreter loads: no import statement in models/
    (function-level ones included) names the training side."""
    graph = import_graph()
    leaks = {m: sorted(t for t in targets if t.split(".")[0] != "models")
             for m, targets in graph.items() if m.split(".")[0] == "models"}
    leaks = {m: targets for m, targets in leaks.items() if targets}
    assert not leaks, f"models/ imports the training side: {leaks}"
