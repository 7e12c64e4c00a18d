"""Health and reflection answer without a token, but a tokenless peer cannot stop the server.

Their streams take one of a few slots of their own and end after a bounded
life; reflection is off unless asked for; the health port answers probes on
threads of its own while every RPC thread is busy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import create_engine, text

from runsvc.server import Server, build
from runsvc.settings import Settings
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import UNLIMITED_RATES
from tests.e2e.conftest import SECRET, token
from tests.e2e.security_server import audit_rows
from tests.support.waiting import wait_for

OPEN_STREAMS = 2
FLOOD = 40  # far more streams than the server has threads (8) or open slots (2)


@contextmanager
def running(db_url: str, tmp_path: Path, **overrides: Any) -> Iterator[Server]:
    settings = Settings(
        **{
            "data_dir": tmp_path,
            "database_url": db_url,
            "grpc_address": "127.0.0.1:0",
            "jwt_secret": SECRET,
            "grpc_max_workers": 8,
            "grpc_open_streams": OPEN_STREAMS,
            "metrics_address": None,
            "rate_limits": UNLIMITED_RATES,
            **overrides,
        }
    )
    server = Server(build(settings), secret=SECRET)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0)


def check(address: str, timeout: float) -> int:
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
        return int(answer.status)


def reflection_call(channel: grpc.Channel) -> Any:
    """An open ServerReflectionInfo stream that asks nothing: it waits for the peer."""
    requests: list[reflection_pb2.ServerReflectionRequest] = []

    def idle() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield from requests  # none: the stream stays open until cancelled
        threading.Event().wait(60)

    return reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(idle())


def test_reflection_is_off_unless_asked_for(db_url: str, tmp_path: Path) -> None:
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    with running(db_url, tmp_path / "off") as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.ServerReflectionInfo(iter([ask]), timeout=5))
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with running(db_url, tmp_path / "on", grpc_reflection=True) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = list(stub.ServerReflectionInfo(iter([ask]), timeout=5))
            names = {s.name for s in answers[0].list_services_response.service}
            assert "runsvc.v1.RunService" in names


def test_a_tokenless_stream_flood_stops_neither_health_nor_get_active(
    db_url: str, tmp_path: Path
) -> None:
    with running(db_url, tmp_path, grpc_reflection=True) as server:
        address = f"127.0.0.1:{server.port}"
        flood = grpc.insecure_channel(address)
        calls: list[Any] = []
        try:
            watch = health_pb2_grpc.HealthStub(flood).Watch
            for i in range(FLOOD):
                if i % 2:
                    calls.append(reflection_call(flood))
                else:
                    calls.append(watch(health_pb2.HealthCheckRequest()))
            # Each stream is either admitted (it holds one of the slots) or refused at once.
            wait_for(lambda: sum(c.done() for c in calls) >= FLOOD - OPEN_STREAMS, timeout=30)
            ended = [c for c in calls if c.done()]
            assert {c.code() for c in ended} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert len(ended) == FLOOD - OPEN_STREAMS

            # Meanwhile the server answers probes and the backend, as if nothing happened.
            assert check(address, timeout=5) == health_pb2.HealthCheckResponse.SERVING
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.RunServiceStub(channel)
                for _ in range(3 * 8):  # more calls than the server has threads
                    with pytest.raises(grpc.RpcError) as none:
                        stub.GetActive(
                            pb.GetActiveRequest(), metadata=token("backend", "t1"), timeout=5
                        )
                    assert none.value.code() is grpc.StatusCode.NOT_FOUND
        finally:
            for call in calls:
                call.cancel()
            flood.close()


def test_an_open_stream_ends_after_its_lifetime_and_frees_its_slot(
    db_url: str, tmp_path: Path
) -> None:
    with running(db_url, tmp_path, grpc_open_streams=1, grpc_open_stream_seconds=1.0) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch
            started = time.monotonic()
            first = watch(health_pb2.HealthCheckRequest(), timeout=30)
            seen = []
            with pytest.raises(grpc.RpcError) as ended:
                for answer in first:
                    seen.append(answer.status)
            lived = time.monotonic() - started
            assert seen == [health_pb2.HealthCheckResponse.SERVING]
            assert ended.value.code() is grpc.StatusCode.CANCELLED
            assert 1.0 <= lived < 25, lived  # its lifetime, not the client's deadline
            # The slot is free again: the next watcher is admitted.
            second = watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(iter(second)).status == health_pb2.HealthCheckResponse.SERVING
            second.cancel()


@pytest.mark.postgres
def test_probes_and_heartbeats_are_answered_while_every_rpc_thread_is_busy(
    postgres_url: str, tmp_path: Path
) -> None:
    """A saturated replica still answers its probes (on both ports) and its heartbeats,
    and sheds other calls at once instead of queueing them."""
    threads = 2
    with running(
        postgres_url,
        tmp_path,
        grpc_max_workers=threads,
        grpc_max_concurrent_rpcs=threads * 2,
        health_address="127.0.0.1:0",
    ) as server:
        engine = create_engine(postgres_url)
        blocker = engine.connect()
        pending: list[Any] = []
        try:
            # Every read of the runs table waits behind this lock: the RPC threads block.
            transaction = blocker.begin()
            blocker.execute(text("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE"))
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            stub = pb_grpc.RunServiceStub(channel)
            pending = [
                stub.GetActive.future(
                    pb.GetActiveRequest(), metadata=token("backend", f"t{i}"), timeout=20
                )
                for i in range(threads * 2)
            ]

            def waiting_on_the_lock() -> bool:
                with engine.connect() as conn:
                    found = conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                        )
                    ).scalar_one()
                return int(found) >= threads

            wait_for(waiting_on_the_lock, timeout=20)
            # Every one of them reached the server: two running, two queued.
            wait_for(lambda: server.calls_held >= threads * 2, timeout=20)
            # Both ports' health answers at once: probes have threads of their own.
            assert server.health_port is not None
            for port in (server.port, server.health_port):
                for _ in range(5):
                    assert (
                        check(f"127.0.0.1:{port}", timeout=2)
                        == health_pb2.HealthCheckResponse.SERVING
                    )
            # One call more than the server takes is shed at once, not queued.
            with pytest.raises(grpc.RpcError) as shed:
                stub.GetActive(pb.GetActiveRequest(), metadata=token("backend", "t9"), timeout=5)
            assert shed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            # A heartbeat is never shed: it reaches the gate on its own threads (this
            # one has no token, so the gate answers it at once).
            with pytest.raises(grpc.RpcError) as heard:
                stub.Heartbeat(pb.HeartbeatRequest(run_id="r", lease_epoch=1), timeout=5)
            assert heard.value.code() is grpc.StatusCode.UNAUTHENTICATED
            transaction.rollback()
            for future in pending:
                with pytest.raises(grpc.RpcError) as none:
                    future.result()
                assert none.value.code() is grpc.StatusCode.NOT_FOUND
            channel.close()
        finally:
            blocker.close()
            engine.dispose()


def test_a_role_denial_flood_is_rate_limited_and_audited_as_counts(
    db_url: str, tmp_path: Path
) -> None:
    """A worker token calling CreateRun over and over: a few counted rows, not one per call."""
    calls = 300
    with running(db_url, tmp_path, rate_limits={"write": (1.0, 5.0)}) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RunServiceStub(channel)
            worker = token("worker", "t1", subject="w1")
            codes: dict[grpc.StatusCode, int] = {}
            for i in range(calls):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.CreateRun(pb.CreateRunRequest(request_id=f"r{i}"), metadata=worker)
                code = refused.value.code()
                codes[code] = codes.get(code, 0) + 1
    # The server has stopped: every count is written.
    assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    # The budget (a burst of 5, one more a second) bounds the role checks, whatever the speed.
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > calls // 2
    rows = [r for r in audit_rows(db_url) if r["tag"] == "SECURITY"]
    by_action: dict[str, list[int]] = {}
    for row in rows:
        by_action.setdefault(row["action"], []).append(json.loads(row["detail"])["count"])
    assert set(by_action) == {"ROLE_DENIED", "RATE_LIMITED_WRITE"}
    # One row at the first refusal of each kind, one with the count of the rest.
    assert all(len(counts) <= 2 for counts in by_action.values()), by_action
    assert sum(by_action["ROLE_DENIED"]) == codes[grpc.StatusCode.PERMISSION_DENIED]
    assert sum(by_action["RATE_LIMITED_WRITE"]) == codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
