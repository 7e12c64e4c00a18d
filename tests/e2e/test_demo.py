"""``make demo`` replays the report's three scenarios, each ending with no active queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.test_cli import clean_environ

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


def test_the_demo_replays_the_three_scenarios() -> None:
    # The script fails by itself when a queue stays active past its bound.
    done = subprocess.run(
        [sys.executable, str(DEMO), "--stale-after", "3"],
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    scenarios = [i for i, line in enumerate(lines) if "] --- " in line]
    assert len(scenarios) == 3, done.stdout
    ends = [
        next(line for line in lines[start:] if "UI: no active queue" in line) for start in scenarios
    ]
    assert len(ends) == 3
    assert any("UI: queue ACTIVE" in line for line in lines[scenarios[0] : scenarios[1]])
    assert any("HEARTBEAT_TIMEOUT" in line for line in lines[scenarios[1] : scenarios[2]])
    assert any("ForceCancel: run 3 cancelled" in line for line in lines[scenarios[2] :])
    assert "cancelled_count=" in done.stdout
