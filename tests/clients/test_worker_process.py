"""The example dialer as a real worker process, killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runsvc.server import Server
from runsvc_client import BackendClient, JobSpec, RunState
from tests.clients.conftest import REAP_INTERVAL, address, running_server, token
from tests.support.waiting import wait_for

STALE_AFTER = 3.0
DIALER = Path(__file__).resolve().parents[2] / "clients" / "examples" / "dialer.py"
SLACK = 1.0  # the poll step, the reaper's own pass and loopback round trips


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[Server]:
    with running_server(sqlite_url, tmp_path, stale_after=STALE_AFTER, slots=10) as running:
        yield running


def start_dialer(server: Server, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSVC_")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                str(DIALER),
                "--address",
                address(server),
                "--token",
                token("worker", subject="dialer-1"),
                "--worker-id",
                "dialer-1",
                "--rate",
                "40",
                "--seed",
                "7",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def test_a_killed_worker_is_detected_within_threshold_plus_reaper_interval(
    server: Server, tmp_path: Path
) -> None:
    backend = BackendClient(address(server), token=token("backend"))
    run = backend.create_run([JobSpec(f"call-{i}") for i in range(100)], request_id="r")
    log = tmp_path / "dialer.log"
    dialer = start_dialer(server, log)
    try:
        wait_for(lambda: backend.get_run(run.id).job_counts.completed > 5, timeout=20)
        assert backend.get_run(run.id).state is RunState.RUNNING
    finally:
        dialer.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        dialer.wait(timeout=10)
    assert dialer.returncode == -signal.SIGKILL
    # ListRuns does not finalize on read: only the reaper can end the run.
    wait_for(
        lambda: next(r for r in backend.list_runs() if r.id == run.id).state is RunState.STOPPED,
        timeout=STALE_AFTER + REAP_INTERVAL + 5,
    )
    detected = time.monotonic() - killed
    assert detected <= STALE_AFTER + REAP_INTERVAL + SLACK, detected
    stopped = backend.get_run(run.id)
    assert stopped.stop_reason == "HEARTBEAT_TIMEOUT"
    assert backend.get_active() is None
    assert "claimed run" in log.read_text()
    backend.close()


def test_a_restarted_worker_resumes_its_run_and_finishes_it(server: Server, tmp_path: Path) -> None:
    backend = BackendClient(address(server), token=token("backend"))
    run = backend.create_run([JobSpec(f"call-{i}") for i in range(60)], request_id="r")
    first = start_dialer(server, tmp_path / "first.log")
    try:
        wait_for(lambda: backend.get_run(run.id).job_counts.completed > 5, timeout=20)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    second = start_dialer(server, tmp_path / "second.log", "--runs", "1")
    try:
        assert second.wait(timeout=30) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(timeout=10)
    output = (tmp_path / "second.log").read_text()
    assert f"resumed run {run.id}" in output
    ended = backend.get_run(run.id)
    counts = ended.job_counts
    assert ended.state is RunState.COMPLETED
    # The call in flight at the kill failed as WORKER_LOST; nothing is left queued.
    assert counts.queued == counts.in_progress == 0
    assert counts.completed + counts.failed == 60
    backend.close()
