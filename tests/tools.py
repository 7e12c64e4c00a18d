"""External tools the tests call (promtool, amtool): found on PATH, or skipped (failed in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def tool(name: str) -> str:
    """The path of ``name``; skip the test when it is missing, fail under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (`make test` installs Debian's package)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(args[0]), *args[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
