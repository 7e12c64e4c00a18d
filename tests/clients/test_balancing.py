"""Clients spread over several replicas, and fail over when one is killed.

The target strings are pure logic; the failover runs two real ``runsvc serve``
processes on one PostgreSQL database and kills one with SIGKILL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runsvc_client import BackendClient, JobSpec, RunState, WorkerClient, target_of
from runsvc_client.balancing import SERVICE_CONFIG, channel_options
from tests.clients.conftest import SECRET, token
from tests.e2e.test_cli import (
    ServerProcess,
    clean_environ,
    free_port,
    handled_calls,
    kill,
    spawn_server,
)

# --- target strings ----------------------------------------------------------------------


def test_a_list_of_ipv4_addresses_becomes_an_ipv4_target() -> None:
    assert target_of(["127.0.0.1:5001", "10.0.0.2:5002"]) == "ipv4:127.0.0.1:5001,10.0.0.2:5002"


def test_a_list_of_ipv6_addresses_becomes_an_ipv6_target() -> None:
    assert target_of(["[::1]:5001", "[fe80::1]:5002"]) == "ipv6:[::1]:5001,[fe80::1]:5002"


def test_a_string_is_a_target_as_it_is() -> None:
    assert target_of("dns:///runsvc.internal:50051") == "dns:///runsvc.internal:50051"
    assert target_of("127.0.0.1:50051") == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ([], "no address"),
        ("", "empty"),
        (["runsvc-a:50051", "runsvc-b:50051"], "dns:///"),
        (["127.0.0.1:5001", "[::1]:5002"], "mix"),
        (["::1:5001"], "brackets"),
        (["127.0.0.1"], "host:port"),
        (["127.0.0.1:0"], "host:port"),
        (["127.0.0.1:http"], "host:port"),
    ],
)
def test_an_unusable_list_is_refused_with_a_reason(addresses: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        target_of(addresses)


def test_balanced_channels_ask_for_round_robin_and_transparent_retries() -> None:
    assert json.loads(SERVICE_CONFIG) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert ("grpc.enable_retries", 1) in channel_options()


def test_a_client_refuses_a_bad_list_before_dialling() -> None:
    with pytest.raises(ValueError, match="dns:///"):
        BackendClient(["runsvc-a:1", "runsvc-b:2"], token="t")


# --- two real replicas, one killed ----------------------------------------------------------


def start_replica(tmp_path: Path, url: str, name: str, address: str | None = None) -> ServerProcess:
    data_dir = tmp_path / name
    data_dir.mkdir(exist_ok=True)
    address = address or f"127.0.0.1:{free_port()}"
    env = {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(data_dir),
        "RUNSVC_DATABASE_URL": url,
        "RUNSVC_GRPC_ADDRESS": address,
        "RUNSVC_JWT_SECRET": SECRET,
        "RUNSVC_STALE_AFTER_SECONDS": "3",
        "RUNSVC_REAP_INTERVAL_SECONDS": "0.5",
        "RUNSVC_GRPC_MAX_WORKERS": "8",
        # The loops below read as fast as the machine goes until both replicas answered:
        # limits this test does not test must not depend on that speed.
        "RUNSVC_RATE_LIMITS": "read=100000:100000,write=100000:100000",
    }
    return spawn_server(env, data_dir, address, tmp_path / f"{name}-{time.monotonic_ns()}.stderr")


def handled(server: ServerProcess, method: str) -> float:
    return handled_calls(server.metrics(), method)


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            started.append(start_replica(tmp_path, postgres_url, name))
        yield started
    finally:
        for server in started:
            kill(server.process)


@pytest.mark.postgres
def test_calls_are_spread_and_fail_over_when_a_replica_is_killed(
    replicas: list[ServerProcess],
) -> None:
    a, b = replicas
    addresses = [a.address, b.address]
    backend = BackendClient(addresses, token=token("backend"))
    worker = WorkerClient(
        addresses, token=token("worker", subject="w1"), worker_id="w1", stale_after=3.0
    )
    with backend, worker:
        run = backend.create_run([JobSpec(f"call-{i}") for i in range(5)], request_id="r1")
        lease = worker.claim()
        assert lease is not None and lease.run_id == run.id
        with lease:
            # round_robin: each replica answers some of the reads (once both are connected).
            deadline = time.monotonic() + 20
            while not (handled(a, "GetRun") > 0 and handled(b, "GetRun") > 0):
                assert time.monotonic() < deadline, "the reads did not reach both replicas"
                for _ in range(10):
                    assert backend.get_run(run.id).state is RunState.RUNNING
                time.sleep(0.05)

            a.process.kill()
            a.process.wait(timeout=10)
            killed = time.monotonic()
            # Every call below must succeed within its retry budget: none may raise.
            reads = 0
            while time.monotonic() - killed < 4.0:  # longer than the stale threshold
                assert backend.get_run(run.id).state is RunState.RUNNING
                assert backend.get_active() is not None
                reads += 1
                time.sleep(0.05)
            assert not lease.lost.is_set(), lease.lost_reason
            assert lease.heartbeat()  # straight to the replica left
            # Not retried by the client: goes to the live replica, never to the dead one.
            cancelled = backend.force_cancel(run.id, reason="failover test")
            assert cancelled.run.state is RunState.CANCELLED
            assert cancelled.cancelled_jobs == 5
    assert reads > 10, reads
    assert b.process.poll() is None


@pytest.mark.postgres
def test_a_killed_replica_that_comes_back_takes_calls_again(
    replicas: list[ServerProcess], postgres_url: str, tmp_path: Path
) -> None:
    a, b = replicas
    with BackendClient([a.address, b.address], token=token("backend")) as backend:
        assert backend.get_active() is None
        a.process.kill()
        a.process.wait(timeout=10)
        for _ in range(10):
            assert backend.get_active() is None
        again = start_replica(tmp_path, postgres_url, "a", a.address)
        replicas.append(again)
        before = handled(again, "GetActive")

        def reached() -> bool:
            backend.get_active()
            return handled(again, "GetActive") > before

        deadline = time.monotonic() + 20
        while not reached():
            # round_robin reconnects on its own backoff (at most a few seconds here).
            assert time.monotonic() < deadline, "the restarted replica got no call"
            time.sleep(0.1)
