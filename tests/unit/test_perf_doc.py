"""docs/performance.md is what the committed benchmark JSON gives: figures are never typed in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_performance_page_matches_the_benchmarks_json() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_perf_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
