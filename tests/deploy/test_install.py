"""The wheels, installed outside the repository the way the image installs them, work.

Builds both distributions with scripts/dist.sh (the image's build stage), installs them
with scripts/install-wheels.sh into a fresh virtualenv in a temporary folder (the image's
final stage), and from that folder: ``runsvc migrate`` on a fresh PostgreSQL database,
``runsvc serve``, health SERVING through ``runsvc health``, one worker's claim,
heartbeat and finish through the installed client package, and SIGTERM stops it cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import clean_environ, free_port
from tests.support.databases import private_database

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
SECRET = "install-test-secret-long-enough-for-hs256"
VERSION = (ROOT / "clients" / "runsvc_client" / "VERSION").read_text().strip()

WORKER_FLOW = """
import sys
from runsvc_client import BackendClient, JobResult, JobSpec, WorkerClient
address, backend_token, worker_token = sys.argv[1:4]
backend = BackendClient(address, token=backend_token)
run = backend.create_run([JobSpec("call-1"), JobSpec("call-2")], request_id="install-1")
worker = WorkerClient(address, token=worker_token, worker_id="installed-worker")
lease = worker.claim()
assert lease is not None and lease.run.id == run.id, lease
assert lease.heartbeat()
jobs, _free = lease.acquire(10)
assert len(jobs) == 2, jobs
lease.report([JobResult.completed(job.id) for job in jobs])
finished = lease.finish()
print(finished.state.value, backend.get_run(run.id).number)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv outside the repository with the two wheels installed, as the image has."""
    place = tmp_path_factory.mktemp("installed")
    assert ROOT not in place.parents
    wheels = place / "dist"
    env = {**os.environ, "PYTHON": sys.executable}
    build = subprocess.run(
        ["sh", str(ROOT / "scripts" / "dist.sh"), str(wheels)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    venv = place / "venv"
    install = subprocess.run(
        ["sh", str(ROOT / "scripts" / "install-wheels.sh"), str(venv), str(wheels)],
        env={**env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    yield venv


def test_the_wheels_are_whole(installed: Path) -> None:
    wheel = next((installed.parent / "dist").glob(f"runsvc-{VERSION}-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "runsvc/migrations/env.py" in names
    assert any(n.startswith("runsvc/migrations/versions/0001_") for n in names)
    client = next((installed.parent / "dist").glob(f"runsvc_client-{VERSION}-*.whl"))
    metadata = zipfile.ZipFile(client).read(f"runsvc_client-{VERSION}.dist-info/METADATA")
    required = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    # The client pulls in gRPC and protobuf only; Flask comes with the "flask" extra.
    assert sorted(r.split(">")[0].split("=")[0] for r in required) == [
        "grpcio",
        "grpcio-status",
        "protobuf",
    ]


def test_an_installed_runsvc_migrates_serves_and_stops(installed: Path, tmp_path: Path) -> None:
    bin_dir = installed / "bin"
    work = tmp_path / "elsewhere"
    work.mkdir()
    with private_database("runsvc_install") as url:
        port, health_port = free_port(), free_port()
        env = {
            **clean_environ(),
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "RUNSVC_DATABASE_URL": url,
            "RUNSVC_DATA_DIR": str(work / "data"),
            "RUNSVC_GRPC_ADDRESS": f"127.0.0.1:{port}",
            "RUNSVC_HEALTH_ADDRESS": f"127.0.0.1:{health_port}",
            "RUNSVC_METRICS_ADDRESS": "off",
            "RUNSVC_JWT_SECRET": SECRET,
        }
        env.pop("PYTHONPATH", None)

        def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                args, env=env, cwd=work, capture_output=True, text=True, timeout=timeout
            )

        migrated = run(str(bin_dir / "runsvc"), "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "database at revision" in migrated.stdout
        with (work / "server.log").open("wb") as log:
            server = subprocess.Popen(
                [str(bin_dir / "runsvc"), "serve"],
                env=env,
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            for _ in range(600):  # up to 60 s: the installed process imports cold
                health = run(
                    str(bin_dir / "runsvc"), "health", "--address", f"127.0.0.1:{health_port}"
                )
                if health.returncode == 0 or server.poll() is not None:
                    break
                subprocess.run(["sleep", "0.1"], check=True)
            assert health.returncode == 0 and health.stdout.strip() == "SERVING", (
                work / "server.log"
            ).read_text()
            tokens = [
                run(str(bin_dir / "runsvc"), "token", "--role", "backend", "--tenant", "t1"),
                run(
                    str(bin_dir / "runsvc"),
                    "token",
                    "--role",
                    "worker",
                    "--tenant",
                    "t1",
                    "--subject",
                    "installed-worker",
                ),
            ]
            assert all(t.returncode == 0 for t in tokens), [t.stderr for t in tokens]
            flow = run(
                str(bin_dir / "python"),
                "-c",
                WORKER_FLOW,
                f"127.0.0.1:{port}",
                tokens[0].stdout.strip(),
                tokens[1].stdout.strip(),
            )
            assert flow.returncode == 0, flow.stderr
            assert flow.stdout.split() == ["completed", "1"]
            # The client it used is the installed one, not this checkout's.
            where = run(
                str(bin_dir / "python"), "-c", "import runsvc_client; print(runsvc_client.__file__)"
            )
            assert str(installed) in where.stdout and str(ROOT) not in where.stdout
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
        assert code == 0, (work / "server.log").read_text()
