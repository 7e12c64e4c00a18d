"""``runsvc serve --workers N``: processes sharing one port, restarted when they die."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from runsvc import settings as settings_module
from runsvc.supervisor import RestartPolicy, Supervisor
from runsvc_client import BackendClient
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.e2e.test_cli import (
    SHUTDOWN_TIMEOUT,
    ServerProcess,
    clean_environ,
    free_port,
    handled_calls,
    json_lines,
    kill,
    runsvc_command,
    scrape,
    spawn_server,
)
from tests.faults.conftest import SECRET, issue

TIMEOUT = 60.0


def free_port_pair() -> int:
    """A port p with p + 1 free too (metrics of two processes)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", base))
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def environ(tmp_path: Path, url: str, address: str, metrics_port: int) -> dict[str, str]:
    return {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(tmp_path),
        "RUNSVC_DATABASE_URL": url,
        "RUNSVC_GRPC_ADDRESS": address,
        "RUNSVC_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
        "RUNSVC_JWT_SECRET": SECRET,
        "RUNSVC_GRPC_MAX_WORKERS": "8",
    }


def records(server: ServerProcess, message: str) -> list[dict[str, Any]]:
    return [r for r in json_lines(server.stderr()) if r.get("message") == message]


def wait_for_log(server: ServerProcess, predicate: Any, *, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for record in json_lines(server.stderr()):
            if predicate(record):
                return record
        time.sleep(0.1)
    pytest.fail(f"no log line for {what} within {TIMEOUT} s:\n{server.stderr()}")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def supervised(postgres_url: str, tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port_pair()
    env = environ(tmp_path, postgres_url, address, metrics_port)
    # The parent starts, then its processes do: twice a lone server's start-up, and more
    # on a busy machine.
    server = spawn_server(
        env, tmp_path, address, tmp_path / "serve.stderr", "--workers", "2", timeout=60
    )
    try:
        wait_for_log(
            server,
            lambda r: r.get("message") == "serving" and r.get("workers") == 2,
            what="both workers serving",
        )
        yield server, metrics_port
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                kill(server.process)


@pytest.mark.postgres
def test_workers_share_the_port_and_a_killed_one_is_restarted(
    supervised: tuple[ServerProcess, int],
) -> None:
    server, metrics_port = supervised
    serving = {r["worker"]: r["pid"] for r in records(server, "worker serving")}
    assert sorted(serving) == [0, 1] and len(set(serving.values())) == 2
    # Only the first process cleans up at start.
    assert [r["worker"] for r in records(server, "startup cleanup done")] == [0]

    # Separate connections land on both processes (kernel-balanced, SO_REUSEPORT).
    metadata = [("authorization", f"Bearer {issue('backend', 't1')}")]
    for _ in range(16):
        with grpc.insecure_channel(
            server.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            with pytest.raises(grpc.RpcError) as answer:
                pb_grpc.RunServiceStub(channel).GetActive(
                    pb.GetActiveRequest(), metadata=metadata, timeout=10
                )
            assert answer.value.code() is grpc.StatusCode.NOT_FOUND
    per_process = [
        handled_calls(scrape(port), "GetActive") for port in (metrics_port, metrics_port + 1)
    ]
    assert sum(per_process) == 16 and min(per_process) > 0, per_process
    # The store is read for /metrics by the first process only, not once per process.
    first, second = scrape(metrics_port), scrape(metrics_port + 1)
    assert "runsvc_runs{" in first and "runsvc_store_up 1.0" in first
    assert "runsvc_runs{" not in second and "runsvc_store_up" not in second
    assert "grpc_server_handled_total{" in second  # its own figures, all the same

    os.kill(serving[1], signal.SIGKILL)
    exited = wait_for_log(
        server,
        lambda r: r.get("message") == "worker exited; restarting it",
        what="the restart of worker 1",
    )
    assert (exited["worker"], exited["signal"], exited["served"]) == (1, "SIGKILL", True)
    restarted = wait_for_log(
        server,
        lambda r: r.get("message") == "worker serving" and r["pid"] not in serving.values(),
        what="worker 1 serving again",
    )
    assert restarted["worker"] == 1
    with BackendClient(server.address, token=issue("backend", "t1")) as backend:
        assert backend.get_active() is None
    assert "grpc_server_handled_total{" in scrape(metrics_port + 1)  # its port is bound again

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=SHUTDOWN_TIMEOUT) == 0, server.stderr()
    assert gone(serving[0]) and gone(restarted["pid"])
    stopped = [r.get("worker") for r in records(server, "stopped")]
    assert sorted(stopped, key=str) == [0, 1, None], stopped  # each process, then the parent


@pytest.mark.postgres
def test_sigint_drains_every_worker(supervised: tuple[ServerProcess, int]) -> None:
    server, _ = supervised
    pids = [r["pid"] for r in records(server, "worker serving")]
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=SHUTDOWN_TIMEOUT) == 0, server.stderr()
    assert all(gone(pid) for pid in pids)
    assert sum(1 for r in records(server, "stopping") if "worker" in r) == 2


@pytest.mark.postgres
def test_workers_that_keep_failing_at_start_stop_the_supervisor(
    postgres_url: str, tmp_path: Path
) -> None:
    metrics_port = free_port_pair()
    env = environ(tmp_path, postgres_url, f"127.0.0.1:{free_port()}", metrics_port)
    settings = settings_module.load(env)
    supervisor = Supervisor(
        settings,
        2,
        command=runsvc_command(),
        environ=env,
        policy=RestartPolicy(initial_backoff=0.05, max_backoff=0.1, max_start_failures=3),
    )
    stop = threading.Event()
    with socket.socket() as taken:
        # Worker 1's metrics port is held by someone else: it can never start.
        taken.bind(("127.0.0.1", metrics_port + 1))
        taken.listen()
        watchdog = threading.Timer(60, stop.set)
        watchdog.start()
        try:
            code = supervisor.run(stop)
        finally:
            watchdog.cancel()
    assert code == 1
    assert all(
        child.process is None or child.process.poll() is not None for child in supervisor.children
    )
    assert supervisor.children[1].start_failures == 3


def refused(env: dict[str, str], *serve_args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*runsvc_command(), "serve", *serve_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    return done


def test_several_workers_refuse_port_0_and_the_sqlite_default(tmp_path: Path) -> None:
    env = {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(tmp_path),
        "RUNSVC_GRPC_ADDRESS": "127.0.0.1:0",
    }
    done = refused(env, "--workers", "2")
    assert "needs an explicit port" in done.stderr
    assert "needs PostgreSQL" in done.stderr
    assert not (tmp_path / "runsvc.db").exists()  # refused before touching anything


def test_workers_must_be_a_sane_count(tmp_path: Path) -> None:
    done = refused({**clean_environ(), "RUNSVC_DATA_DIR": str(tmp_path)}, "--workers", "0")
    assert "--workers must be between 1 and 64" in done.stderr
