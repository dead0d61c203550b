import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pipeline_helpers  # noqa: E402  (imports the project, so after the path is set)


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
    return pipeline_helpers.shared_dataset(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data) -> str:
    """The output folder of one uninterrupted 4-epoch CLI run on ``data``."""
    return pipeline_helpers.reference_run(str(tmp_path_factory.getbasetemp()))
