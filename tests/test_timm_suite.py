"""timm's own model tests on MG-SSAF: ``tests/test_models.py`` of the installed timm version,
fetched from its sdist at test time (not copied into this repository), run with pytest against
``mg_ssaf_t``/``mg_ssaf_s``/``mg_ssaf_b`` as timm runs it on its zoo (tests/timm_suite_plugin.py
registers the models before collection and adds their module to timm's ``FEAT_INTER_FILTERS``).

Every collected test must pass except timm's two TorchScript tests
(``test_model_forward_torchscript``, ``test_model_forward_fx_torchscript``), deselected: MG-SSAF
does not support ``torch.jit.script`` (docs/timm-backbone.md). The sdist comes from the
package index pip is configured with, once per timm version, into ``$MGSSAF_TIMM_TESTS_CACHE``
(default: the system temp folder); without a reachable index the tests are skipped, saying so.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TIMM_VERSION = importlib.metadata.version("timm")
DESELECTED = "torchscript"  # MG-SSAF does not support torch.jit.script
# the tests timm runs on every model of its zoo with forward_intermediates (none may go missing)
EXPECTED = {"test_model_forward", "test_model_backward", "test_model_default_cfgs",
            "test_model_forward_features", "test_model_forward_intermediates_features",
            "test_model_forward_intermediates", "test_prune_intermediate_layers_contract",
            "test_model_forward_fx", "test_model_backward_fx"}


def _fetch_timm_tests(cache: str) -> str:
    """``cache/test_models.py`` of timm ``TIMM_VERSION``'s sdist (downloaded if absent)."""
    target = os.path.join(cache, "test_models.py")
    if os.path.isfile(target):
        return target
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                 "--disable-pip-version-check", "--quiet", "--timeout", "30", "--dest", tmp,
                 f"timm=={TIMM_VERSION}"], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download timm=={TIMM_VERSION} timed out (no package index "
                        "reachable?)")
        sdists = glob.glob(os.path.join(tmp, "timm-*.tar.gz"))
        if done.returncode or not sdists:
            pytest.skip(f"cannot fetch timm=={TIMM_VERSION}'s sdist for its tests/test_models.py "
                        f"(no package index reachable?): {done.stderr.strip()[-300:]}")
        with tarfile.open(sdists[0]) as sdist:
            member = next((m for m in sdist.getmembers()
                           if m.name.endswith("/tests/test_models.py")), None)
            if member is None:
                pytest.fail(f"timm {TIMM_VERSION}'s sdist has no tests/test_models.py")
            source = sdist.extractfile(member).read()
        staged = os.path.join(tmp, "test_models.py")
        with open(staged, "wb") as f:
            f.write(source)
        os.replace(staged, target)  # atomic: parallel sessions may race harmlessly
    return target


@pytest.fixture(scope="module")
def timm_tests() -> str:
    cache = os.environ.get("MGSSAF_TIMM_TESTS_CACHE") or tempfile.gettempdir()
    return _fetch_timm_tests(os.path.join(cache, f"mgssaf-timm-{TIMM_VERSION}-tests"))


@pytest.mark.parametrize("name", [
    pytest.param("mg_ssaf_t", marks=pytest.mark.slow),
    pytest.param("mg_ssaf_s", marks=pytest.mark.slow),
    pytest.param("mg_ssaf_b", marks=pytest.mark.slow),
])
def test_timm_model_suite(timm_tests, name, tmp_path):
    """timm's tests/test_models.py on ``name``: every collected test passes (TorchScript
    deselected), and each test timm runs on its zoo's forward_intermediates models is among
    them."""
    report = tmp_path / "report.xml"
    env = dict(os.environ, MGSSAF_TIMM_MODELS=name, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("GITHUB_ACTIONS", None)  # timm's file selects fewer tests on GitHub's runners
    done = subprocess.run(
        [sys.executable, "-m", "pytest", timm_tests, "-p", "timm_suite_plugin",
         "-p", "no:cacheprovider", "-q", "-W", "ignore::pytest.PytestUnknownMarkWarning",
         "--rootdir", os.path.dirname(timm_tests), "-k", f"{name} and not {DESELECTED}",
         f"--junitxml={report}"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    ran = {case.get("name").split("[")[0] for case in cases
           if not any(child.tag in ("skipped", "failure", "error") for child in case)}
    assert EXPECTED <= ran, f"not run or skipped: {sorted(EXPECTED - ran)}"
