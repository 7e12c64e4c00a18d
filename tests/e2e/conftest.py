"""A real runsvc server on a free loopback port, on each store engine in turn."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest

from runsvc import tokens
from runsvc.server import Server, build
from runsvc.settings import Settings
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import UNLIMITED_RATES

SECRET = "e2e-secret-that-is-long-enough-for-hs256-keys"
STALE_AFTER = 1.5
REAP_INTERVAL = 0.5


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        grpc_address="127.0.0.1:0",
        stale_after_seconds=STALE_AFTER,
        reap_interval_seconds=REAP_INTERVAL,
        tenant_slots=3,
        jwt_secret=SECRET,
        grpc_max_workers=16,
        metrics_address="127.0.0.1:0",
        rate_limits=UNLIMITED_RATES,
    )
    running = Server(build(settings), secret=SECRET)
    running.start()
    yield running
    running.stop(grace=0)


@pytest.fixture
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.RunServiceStub:
    return pb_grpc.RunServiceStub(channel)


def token(
    role: str, tenant: str | None = None, ttl: int = 600, subject: str | None = None
) -> list[tuple[str, str]]:
    """Metadata with an HS256 token; a worker's ``worker_id`` must be its subject (or start
    with the subject and a slash)."""
    issued = tokens.issue(SECRET, role=role, tenant_id=tenant, ttl_seconds=ttl, subject=subject)
    return [("authorization", f"Bearer {issued}")]


def expired_token() -> list[tuple[str, str]]:
    now = int(time.time())
    issued = jwt.encode(
        {"sub": "x", "role": "backend", "tenant": "t1", "iat": now - 600, "exp": now - 60},
        SECRET,
        algorithm="HS256",
    )
    return [("authorization", f"Bearer {issued}")]
