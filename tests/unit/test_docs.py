"""The README is a front door: short, and every link in it (and in the changelog) leads somewhere.

The docs site itself is checked by ``mkdocs build --strict`` in ``make test``: a link to a page
or an anchor that does not exist fails it, and so does a page left out of the navigation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAX_README_LINES = 250


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= MAX_README_LINES


@pytest.mark.parametrize("name", ["README.md", "CHANGELOG.md", "SECURITY.md"])
def test_every_relative_link_leads_to_a_file(name: str) -> None:
    page = ROOT / name
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert broken == []


def test_the_readme_keeps_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "make run" in text and "make test" in text
