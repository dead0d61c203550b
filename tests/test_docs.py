"""The documentation's own promises: README.md stays short, and every relative link in README.md
and docs/*.md leads to a file that exists (and, with ``#anchor``, to a heading of that file)."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 260
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(path: str) -> list[str]:
    """The lines of ``path`` outside fenced and indented code blocks."""
    lines, fenced = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if FENCE.match(line):
                fenced = not fenced
            elif not fenced and not line.startswith("    "):
                lines.append(line.rstrip("\n"))
    return lines


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path):
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            base = _anchor(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def _links(path: str) -> list[str]:
    return [target for line in _prose(path) for target in LINK.findall(line)]


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        count = sum(1 for _ in f)
    assert count < README_MAX_LINES, f"README.md has {count} lines; move detail into docs/"


def test_docs_folder_has_the_pages_the_readme_promises():
    assert len(PAGES) > 1, "docs/*.md not found"
    readme_targets = {os.path.normpath(t.split("#")[0]) for t in _links(README)}
    for page in PAGES[1:]:
        assert os.path.relpath(page, ROOT) in readme_targets, f"README.md does not link {page}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not checked here
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(file):
            broken.append(f"{target}: no file {os.path.relpath(file, ROOT)}")
        elif anchor and (not file.endswith(".md") or anchor not in _anchors(file)):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{os.path.relpath(page, ROOT)}: " + "; ".join(broken)


def test_anchor_rule():
    assert _anchor("Measuring speed: `tools/benchmark.py`") == "measuring-speed-toolsbenchmarkpy"
    assert _anchor("torch.hub") == "torchhub"
    assert _anchor("Importing from outside the repository") == (
        "importing-from-outside-the-repository")
