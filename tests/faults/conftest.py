"""Real runsvc server processes on PostgreSQL, real worker processes, real signals.

The fast variants run in ``make test`` with a stale threshold of 2 s; the
full ones (``make test-faults``) set ``RUNSVC_FAULTS_FULL=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select

from runsvc import tokens
from runsvc.store import check
from runsvc.store.schema import audit_events, jobs, runs
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import UNLIMITED_RATES
from tests.e2e.test_cli import (
    ServerProcess,
    clean_environ,
    free_port,
    json_lines,
    spawn_server,
)

pytestmark = pytest.mark.postgres

SECRET = "fault-tests-secret-that-is-long-enough-for-hs256"
FULL = os.environ.get("RUNSVC_FAULTS_FULL") == "1"
STALE_AFTER = 2.0
REAP_INTERVAL = 0.5
WORKER = Path(__file__).with_name("worker.py")
DIALER = Path(__file__).resolve().parents[2] / "clients" / "examples" / "dialer.py"


def issue(role: str, tenant: str | None = None, subject: str | None = None) -> str:
    return tokens.issue(SECRET, role=role, tenant_id=tenant, ttl_seconds=3600, subject=subject)


def start_server(
    data_dir: Path, pg_url: str, *, address: str | None = None, **extra: str
) -> ServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    address = address or f"127.0.0.1:{free_port()}"
    stderr_path = data_dir / f"server-{time.monotonic_ns()}.stderr"
    env = {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(data_dir),
        "RUNSVC_GRPC_ADDRESS": address,
        "RUNSVC_DATABASE_URL": pg_url,
        "RUNSVC_JWT_SECRET": SECRET,
        "RUNSVC_STALE_AFTER_SECONDS": str(STALE_AFTER),
        "RUNSVC_REAP_INTERVAL_SECONDS": str(REAP_INTERVAL),
        "RUNSVC_TENANT_SLOTS": "5",
        "RUNSVC_GRPC_MAX_WORKERS": "8",
        # Fault tests do not test the rate limits: no load of theirs may meet one.
        "RUNSVC_RATE_LIMITS": ",".join(f"{name}=1000000:1000000" for name in UNLIMITED_RATES),
        **extra,
    }
    return spawn_server(env, data_dir, address, stderr_path)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path
    worker_id: str

    def lines(self) -> list[dict[str, Any]]:
        return json_lines(self.log.read_text(errors="replace"))

    def run_id(self, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line["call"] == "ClaimRun" and line["code"] == "OK":
                    return str(line["run_id"])
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"worker {self.worker_id} claimed nothing: {self.log.read_text()}")


@dataclass
class Fleet:
    """Every process a test started, killed at its end whatever happened."""

    tmp: Path
    pg_url: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def server(self, *, address: str | None = None, **extra: str) -> ServerProcess:
        server = start_server(self.tmp / "server", self.pg_url, address=address, **extra)
        self.processes.append(server.process)
        return server

    def worker(self, address: str, tenant: str, worker_id: str, *args: str) -> Worker:
        log = self.tmp / f"{worker_id}.jsonl"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "--address",
                    address,
                    "--token",
                    issue("worker", tenant, subject=worker_id),
                    "--worker-id",
                    worker_id,
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_environ(),
            )
        self.processes.append(process)
        return Worker(process, log, worker_id)

    def dialer(self, address: str, tenant: str, worker_id: str, *args: str) -> Worker:
        """The example dialer: the client package's Lease, which fences itself."""
        log = self.tmp / f"{worker_id}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(DIALER),
                    "--address",
                    address,
                    "--token",
                    issue("worker", tenant, subject=worker_id),
                    "--worker-id",
                    worker_id,
                    "--rate",
                    "20",
                    "--runs",
                    "1",
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_environ(),
            )
        self.processes.append(process)
        return Worker(process, log, worker_id)

    def create_run(self, address: str, tenant: str, jobs: int) -> str:
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.RunServiceStub(channel).CreateRun(
                pb.CreateRunRequest(
                    request_id=f"req-{tenant}",
                    jobs=[pb.JobSpec(external_id=f"c{i}", payload=b"x") for i in range(jobs)],
                ),
                metadata=[("authorization", f"Bearer {issue('backend', tenant)}")],
                timeout=10,
            )
        return str(reply.run.id)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


@pytest.fixture
def fleet(postgres_url: str, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, postgres_url)
    try:
        yield fleet
    finally:
        fleet.stop_all()


class Store:
    """Reads the database directly: what the test checks, never judged on read."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, pool_size=1)

    def run(self, run_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(runs).where(runs.c.id == run_id)).one()

    def job_states(self, run_id: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs.c.state, jobs.c.stop_reason).where(jobs.c.run_id == run_id)
            )
            counts: dict[str, int] = {}
            for state, reason in rows:
                key = f"{state}:{reason}" if reason else state
                counts[key] = counts.get(key, 0) + 1
            return counts

    def stale_detections(self) -> int:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(audit_events.c.id).where(audit_events.c.tag == "STALE_DETECTION")
            )
            return len(rows.all())

    def violations(self) -> list[check.Violation]:
        with self.engine.connect() as conn:
            return check.violations(conn)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def store(postgres_url: str) -> Iterator[Store]:
    db = Store(postgres_url)
    yield db
    # Nothing lost: the invariants hold after every scenario.
    found = db.violations()
    db.close()
    assert found == [], found
