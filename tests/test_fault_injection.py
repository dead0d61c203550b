"""A few cases of tests/fault_injection.py: interrupted runs resume at the saved step,
bit-exact, with ckpt_best.pth at the end. The full run: python tests/fault_injection.py."""
from __future__ import annotations

import pytest

import fault_injection as fi

pytestmark = pytest.mark.cli


def test_kill_9_inside_a_save_and_sigusr1_during_validation_resume_exactly(tmp_path):
    cases = [fi.Case(0, "plain", "SIGKILL", "save", epoch=0, step=0, to_group=True, delay=0.3),
             fi.Case(1, "plain", "SIGUSR1", "validation", epoch=1, step=2, to_group=False,
                     delay=0.0)]
    tried, held, failures = fi.run(cases, str(tmp_path))
    assert (tried, held) == (2, 2), failures


@pytest.mark.slow
def test_sigterm_to_torchrun_mid_step_resumes_exactly(tmp_path):
    cases = [fi.Case(0, "torchrun", "SIGTERM", "step", epoch=0, step=5, to_group=False,
                     delay=0.0)]
    tried, held, failures = fi.run(cases, str(tmp_path))
    assert (tried, held) == (1, 1), failures
