"""Mutation check: break one promised property at a time and see that the tests notice.

    python tools/mutation_check.py              # every mutant of tests/mutants.py
    python tools/mutation_check.py --list       # names and properties only
    python tools/mutation_check.py --only NAME [NAME ...]

Each mutant of ``tests/mutants.py`` replaces one piece of code (which must occur exactly once in
its file) in a scratch copy of the working tree, then runs the tests named with it there (after
checking once that those tests pass on the unmutated tree). A
mutant is *caught* when one of those tests fails, *survives* when they all pass, and is *stale*
when its code no longer occurs (the list must follow the code). The report names the test that
caught each mutant; the exit status is 1 when any mutant survived or is stale.

Run the whole list before resolving an issue and before a release (about 15 minutes on 2 CPU
cores); CI runs one mutant as a smoke check (tests/test_tools.py).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from mutants import MUTANTS, Mutant  # noqa: E402

REFERENCE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "reference")


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # "caught", "SURVIVED", "STALE" or "ERROR"
    detail: str
    seconds: float


def scratch_copy(destination: str) -> None:
    """The working tree's files that git tracks or would track (uncommitted edits included)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):
            target = os.path.join(destination, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)


def apply(mutant: Mutant, tree: str) -> str | None:
    """Applies ``mutant`` in ``tree``; returns why it could not be applied, or None."""
    path = os.path.join(tree, mutant.file)
    if not os.path.isfile(path):
        return f"{mutant.file} does not exist"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutant.old)
    if count != 1:
        return f"the code to replace occurs {count} times in {mutant.file} (expected once)"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(mutant.old, mutant.new))
    return None


def run_mutant(mutant: Mutant, timeout: float) -> Outcome:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        tree = os.path.join(tmp, "repo")
        scratch_copy(tree)
        problem = apply(mutant, tree)
        if problem:
            return Outcome(mutant, "STALE", problem, time.monotonic() - start)
        # an empty Inductor cache: torch.compile's caches may hand back graphs compiled from the
        # unmutated code (the autograd-cache key does not cover custom ops' Python formulas)
        env = dict(os.environ, MGSSAF_REFERENCE_DIR=REFERENCE_DIR,
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor-cache"))
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider",
                   *mutant.tests]
        try:
            result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, "ERROR", f"tests still running after {timeout:.0f} s",
                           time.monotonic() - start)
    seconds = time.monotonic() - start
    if result.returncode == 0:
        return Outcome(mutant, "SURVIVED", "all of its tests passed", seconds)
    failed = re.findall(r"^FAILED (\S+)", result.stdout, re.MULTILINE)
    if result.returncode == 1 and failed:
        return Outcome(mutant, "caught", failed[0], seconds)
    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    return Outcome(mutant, "ERROR", f"pytest exit {result.returncode}: " + " | ".join(tail),
                   seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.property} ({m.file}; tests: {' '.join(m.tests)})")
        return 0
    tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p",
                               "no:cacheprovider", *tests], cwd=ROOT, capture_output=True,
                              text=True)
    if baseline.returncode != 0:  # a failure would count as a catch: the check means nothing
        print(baseline.stdout[-3000:] + baseline.stderr[-2000:])
        print("the mutants' tests fail on the unmutated tree; fix that first")
        return 1
    print(f"unmutated tree: the {len(tests)} tests pass", flush=True)
    outcomes = []
    for m in chosen:
        outcome = run_mutant(m, args.timeout)
        outcomes.append(outcome)
        print(f"{outcome.verdict:8} {m.name} ({outcome.seconds:.0f} s): {outcome.detail}",
              flush=True)
    bad = [o for o in outcomes if o.verdict != "caught"]
    print(f"{len(outcomes) - len(bad)} of {len(outcomes)} mutants caught"
          + (f"; not caught: {', '.join(o.mutant.name for o in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
