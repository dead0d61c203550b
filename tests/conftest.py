import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def reference_dir() -> str:
    """../shared/reference beside the checkout (spec, keys files, golden tensors)."""
    if not os.path.isdir(REFERENCE_DIR):
        pytest.skip(f"reference folder {REFERENCE_DIR} is absent (it holds the golden files and "
                    "keys files; CI has it)")
    return REFERENCE_DIR
