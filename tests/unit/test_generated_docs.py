"""Generated docs pages are what their sources give: figures and defaults are never typed in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runsvc import settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "generator",
    [
        "gen_perf_doc.py",  # docs/performance.md from bench/results/latest.json
        "gen_settings_doc.py",  # docs/settings.md from runsvc/settings.py
        "gen_capacity_doc.py",  # docs/capacity.md from the benchmarks' JSON and the defaults
    ],
)
def test_the_generated_page_matches_its_source(generator: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / generator), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_every_setting_has_one_variable_and_help() -> None:
    names = settings.variables()
    assert len(names) == len(set(names))
    for declared in settings.declared():
        meta = declared.metadata
        assert meta["variable"].startswith("RUNSVC_"), declared.name
        assert meta["help"].strip(), declared.name
        assert callable(meta["parse"]), declared.name


def test_no_test_or_benchmark_switch_is_a_setting() -> None:
    names = settings.variables()
    assert not [n for n in names if "TESTONLY" in n or "GROUP_COMMIT" in n]
