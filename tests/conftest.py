import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/reference beside the checkout; tools/mutation_check.py points its scratch copies here
REFERENCE_DIR = os.environ.get("MGSSAF_REFERENCE_DIR") or os.path.join(os.path.dirname(ROOT),
                                                                        "shared", "reference")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# torch.compile's on-disk caches key a compiled backward by the traced forward graph, not by the
# Python autograd formulas of the custom ops in it: after a formula changes, a shared cache hands
# back graphs compiled from the old one. Unless TORCHINDUCTOR_CACHE_DIR is set, the tests compile
# into a folder of their own per user and version of models/ (checkouts of other versions may run
# at the same time); such folders unused for a day are removed. This runs before anything calls
# into Inductor, which fills the variable in.
def _tests_inductor_cache() -> str:
    import getpass
    import glob
    import hashlib
    import shutil
    import tempfile
    import time

    sources = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(ROOT, "models"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "models", name), "rb") as f:
                sources.update(name.encode() + b"\0" + f.read())
    prefix = os.path.join(tempfile.gettempdir(), f"mgssaf-tests-inductor-{getpass.getuser()}-")
    folder = prefix + sources.hexdigest()[:16]
    for old in glob.glob(prefix + "*"):
        try:
            if old != folder and time.time() - os.path.getmtime(old) > 86400:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.utime(folder)
    return folder


if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _tests_inductor_cache()

import helpers  # noqa: E402  (imports the project, so after the path is set)

# ------------------------------------------------------------------------------------------------
# The cli tier cannot rot: a test that starts one of the repository's command lines in a
# subprocess without the ``cli`` mark fails, naming the command.
# ------------------------------------------------------------------------------------------------
ENTRY_POINTS = ("main.py", "main_seg.py")
LAUNCHERS = ("torch.distributed.run", "torch.distributed.launch", "torchrun")
# python -c code that imports an entry point (a wrapper around main.main that injects a fault)
IMPORTS_AN_ENTRY_POINT = re.compile(r"^\s*(import|from)\s[^\n]*\bmain(_seg)?\b", re.MULTILINE)


def cli_command(args) -> str | None:
    """What makes the subprocess command line ``args`` a run of one of this repository's command
    lines (None: it is none)."""
    argv = [os.fsdecode(a) for a in
            ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
    for i, arg in enumerate(argv):
        if os.path.basename(arg) in ENTRY_POINTS + LAUNCHERS:
            return arg
        if arg.endswith(".py") and os.path.relpath(os.path.join(ROOT, arg), ROOT).startswith(
                "tools" + os.sep):
            return arg
        if arg == "-c" and i + 1 < len(argv):
            found = IMPORTS_AN_ENTRY_POINT.search(argv[i + 1])
            if found:
                return f"python -c '{found.group(0).strip()} ...'"
        if arg.endswith(".py") and os.path.isfile(arg):  # a wrapper script written by a test
            with open(arg, encoding="utf-8", errors="replace") as f:
                found = IMPORTS_AN_ENTRY_POINT.search(f.read())
            if found:
                return f"{arg} ('{found.group(0).strip()} ...')"
    return None


_POPEN = subprocess.Popen
_running: list = []  # the test item being run (its setup, call and teardown)


class CheckedPopen(subprocess.Popen):
    """subprocess.Popen that fails the running test if it starts a command line without the
    ``cli`` mark (subprocess.run and friends go through it too)."""

    def __init__(self, args, *more, **kwargs):
        command = cli_command(args)
        if command and _running and _running[-1].get_closest_marker("cli") is None:
            pytest.fail(f"{_running[-1].nodeid} starts a command line ({command}) but is not "
                        "marked cli: add pytestmark = pytest.mark.cli to its module or "
                        "@pytest.mark.cli to it", pytrace=False)
        super().__init__(args, *more, **kwargs)


def pytest_configure(config):
    subprocess.Popen = CheckedPopen


def pytest_unconfigure(config):
    subprocess.Popen = _POPEN


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


@pytest.fixture(scope="session")
def reference_dir() -> str:
    """../shared/reference beside the checkout (spec, keys files, golden tensors)."""
    if not os.path.isdir(REFERENCE_DIR):
        pytest.skip(f"reference folder {REFERENCE_DIR} is absent (it holds the golden files and "
                    "keys files; CI has it)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> str:
    """A tiny generated ImageFolder (train/ and val/) shared by the CLI tests."""
    return helpers.shared_dataset(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data) -> str:
    """The output folder of one uninterrupted 4-epoch CLI run on ``data``."""
    return helpers.reference_run(str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def one_thread_openmp_team(monkeypatch):
    """models.ckernel's OpenMP entry points replaced by a runtime that starts a team of one,
    whatever the kernel asks for (as OpenMP may: OMP_DYNAMIC, thread limits, nesting)."""
    import ctypes

    from models import ckernel

    task = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    def parallel(fn, data, num_threads, flags):
        task(fn)(data)

    zero, one = (ctypes.CFUNCTYPE(ctypes.c_int)(lambda v=v: v) for v in (0, 1))
    entry_points = tuple(ctypes.cast(f, ctypes.c_void_p).value for f in (parallel, zero, one))
    monkeypatch.setattr(ckernel, "openmp_pool", lambda: entry_points)
    yield
    del parallel, zero, one  # kept alive while the kernels may call them


class OpenMPRecord:
    """What the C kernels did through a recording OpenMP pool: ``launches`` (kernel calls that
    asked for the pool) and ``thread_numbers`` (the OpenMP thread numbers that did work)."""

    def __init__(self) -> None:
        self.launches = 0
        self.thread_numbers: set[int] = set()


@pytest.fixture
def recording_openmp_pool(monkeypatch):
    """models.ckernel's OpenMP entry points wrapped so that a test can see that a kernel ran and
    on which of PyTorch's OpenMP threads (the real runtime still does the work)."""
    import ctypes
    import threading

    import torch

    from models import ckernel

    real_parallel, real_thread_num, real_num_threads = ckernel.openmp_pool()
    if real_parallel is None:
        pytest.skip("PyTorch is not built with OpenMP here")
    record = OpenMPRecord()
    lock = threading.Lock()
    to_int = ctypes.CFUNCTYPE(ctypes.c_int)
    thread_num_of_runtime = to_int(real_thread_num)

    @to_int
    def thread_num():
        number = thread_num_of_runtime()
        with lock:
            record.thread_numbers.add(number)
        return number

    def pool():
        record.launches += 1
        return real_parallel, ctypes.cast(thread_num, ctypes.c_void_p).value, real_num_threads

    monkeypatch.setattr(ckernel, "openmp_pool", pool)
    yield record
    del thread_num  # kept alive while the kernels may call it
