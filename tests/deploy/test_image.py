"""The Dockerfile: hadolint clean, and built from the same two scripts the install test runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def stages() -> list[list[str]]:
    """The instructions of each stage, continuation lines joined."""
    found: list[list[str]] = []
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            found.append([])
        found[-1].append(line)
    return found


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    done = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_built_by_the_steps_the_install_test_runs() -> None:
    build, final = stages()
    assert any("scripts/dist.sh" in line for line in build)
    assert any(line.startswith("RUN") and "install-wheels.sh" in line for line in final)
    # No source tree and no compiler in the final stage: only the wheels and the script.
    copies = [line for line in final if line.startswith("COPY")]
    assert copies == [
        "COPY --from=build /dist /dist",
        "COPY scripts/install-wheels.sh /tmp/install-wheels.sh",
    ]
    assert final[0].startswith("FROM python:3.11-slim")
    assert not any("gcc" in line or "build-essential" in line for line in final)
    # Runs as a user of its own, stops on SIGTERM, checks itself through gRPC health.
    assert "USER 10001" in final
    assert "STOPSIGNAL SIGTERM" in final
    health = next(line for line in final if line.startswith("HEALTHCHECK"))
    assert '"runsvc", "health"' in health
    assert final[-2:] == ['ENTRYPOINT ["runsvc"]', 'CMD ["serve"]']
