"""Small C kernels for the CPU paths of ``models/``, built with the system C compiler.

A kernel's source is compiled on first use (a fraction of a second), for the instruction set
PyTorch itself dispatches to (``torch.backends.cpu.get_cpu_capability()``), and cached in
``~/.cache/mgssaf`` (``$XDG_CACHE_HOME/mgssaf``) under a hash of its source, flags, compiler and
machine. Kernels run their parallel loops on PyTorch's own OpenMP threads (``openmp_pool``):
threads of another pool would compete with PyTorch's spinning workers. Where there is no C
compiler, ``load`` returns None and the caller keeps its plain PyTorch path (the reason is logged
as a warning). The compiler is ``$CC``, else the one Python was built with, else ``cc``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from typing import Callable, Optional, Sequence

import torch

__all__ = ["capability", "load", "openmp_pool"]

_logger = logging.getLogger(__name__)
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
_lock = threading.Lock()
_libraries: dict[tuple, Optional[ctypes.CDLL]] = {}


def capability() -> str:
    """``AVX512``, ``AVX2`` or ``DEFAULT``: the vector instructions the kernels are built for."""
    isa = torch.backends.cpu.get_cpu_capability()
    return isa if isa in _ISA_FLAGS else "DEFAULT"


def _compiler() -> list[str]:
    """The C compiler command: ``$CC``, else the one Python was built with if it is installed,
    else ``cc``."""
    for command in (os.environ.get("CC"), sysconfig.get_config_var("CC")):
        words = shlex.split(command or "")
        if words and shutil.which(words[0]):
            return words
    return ["cc"]


def _build(name: str, source: str, flags: list[str]) -> Optional[str]:
    """Path of the compiled shared library (built if not cached), or None (no working compiler,
    or an unwritable cache; the reason is logged once)."""
    compiler = _compiler()
    # the machine and compiler are in the key: a home directory may be shared between hosts
    key = hashlib.sha256("\0".join([source, *flags, *compiler, platform.machine()])
                         .encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "mgssaf")
    path = os.path.join(cache, f"{name}_{key}.so")
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = os.path.join(tmp, f"{name}.c")
            with open(src, "w", encoding="ascii") as f:
                f.write(source)
            built = os.path.join(tmp, f"{name}.so")
            subprocess.run([*compiler, *flags, src, "-o", built, "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(built, path)  # atomic: concurrent ranks may race harmlessly
    except subprocess.CalledProcessError as e:
        _logger.warning(f"{' '.join(compiler)} could not build the {name} kernel "
                        f"({e.stderr.strip()[:500]}); using PyTorch ops instead")
        return None
    except (OSError, subprocess.SubprocessError) as e:
        _logger.warning(f"no {name} kernel ({e}); using PyTorch ops instead")
        return None
    return path


def load(name: str, source: str, defines: dict[str, object],
         setup: Callable[[ctypes.CDLL], None],
         flags: Sequence[str] = ()) -> Optional[ctypes.CDLL]:
    """The library built from ``source`` with ``-D`` ``defines`` and extra compiler ``flags`` for
    this machine's instruction set (once per process and arguments; ``setup`` declares its
    functions' argument types), or None where there is no working C compiler."""
    flags = ["-O3", "-shared", "-fPIC", *(f"-D{k}={v}" for k, v in sorted(defines.items())),
             *_ISA_FLAGS.get(capability(), []), *flags]
    key = (name, source, tuple(flags))
    with _lock:
        if key not in _libraries:
            path = _build(name, source, flags)
            try:
                library = ctypes.CDLL(path) if path else None
            except OSError as e:  # e.g. a truncated file, or a cache on a noexec mount
                _logger.warning(f"cannot load {path} ({e}); using PyTorch ops instead")
                library = None
            if library is not None:
                setup(library)
            _libraries[key] = library
        return _libraries[key]


@functools.lru_cache(maxsize=None)
def openmp_pool() -> tuple[Optional[int], Optional[int], Optional[int]]:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` as
    libtorch_cpu resolves them, i.e. of the OpenMP runtime whose threads PyTorch runs its
    intra-op work on, or ``(None, None, None)`` (another parallel backend, or the library not
    found): kernels then run on the calling thread."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, None, None
    try:
        # dlsym on libtorch_cpu's handle searches its own dependencies: PyTorch's runtime
        torch_cpu = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                             "libtorch_cpu.so"))
        return tuple(ctypes.cast(getattr(torch_cpu, name), ctypes.c_void_p).value
                     for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
    except (OSError, AttributeError):
        return None, None, None
