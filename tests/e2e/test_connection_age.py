"""Connections age out gracefully, so balancing clients re-resolve and reach new replicas."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runsvc.server import Server, build
from runsvc.settings import Settings
from runsvc.store import migrate
from tests.e2e.conftest import SECRET


def test_an_aged_connection_is_replaced_without_failing_a_call(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'age.db'}",
        grpc_address="127.0.0.1:0",
        metrics_address=None,
        jwt_secret=SECRET,
        grpc_max_connection_age_seconds=0.5,
    )
    migrate.upgrade(settings.effective_database_url)
    server = Server(build(settings), secret=SECRET)
    server.start()
    states: list[grpc.ChannelConnectivity] = []
    lock = threading.Lock()

    def seen(state: grpc.ChannelConnectivity) -> None:
        with lock:
            states.append(state)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            channel.subscribe(seen)
            health = health_pb2_grpc.HealthStub(channel)
            answers = []
            stop = time.monotonic() + 3.0
            while time.monotonic() < stop:  # bounded: three seconds of calls
                answers.append(
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                )
                time.sleep(0.05)
            channel.unsubscribe(seen)
    finally:
        server.stop(grace=0)
    assert all(a.status == health_pb2.HealthCheckResponse.SERVING for a in answers)
    with lock:
        ready = [i for i, s in enumerate(states) if s is grpc.ChannelConnectivity.READY]
    # Connected, told to go away, connected again: more than one READY spell.
    assert len(ready) >= 2, states
