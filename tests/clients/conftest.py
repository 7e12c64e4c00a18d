"""A real runsvc server on a free loopback port, and tokens for the client package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runsvc import tokens
from runsvc.server import Server, build
from runsvc.settings import Settings
from runsvc.store.engine import make_engine
from runsvc.store.schema import metadata
from tests.conftest import UNLIMITED_RATES

SECRET = "client-tests-secret-long-enough-for-hs256"
REAP_INTERVAL = 0.5


def token(role: str, tenant: str | None = "t1", *, subject: str | None = None) -> str:
    """An HS256 token; a worker's ``worker_id`` must be its subject (or start with it and '/')."""
    return tokens.issue(SECRET, role=role, tenant_id=tenant, ttl_seconds=600, subject=subject)


@contextmanager
def running_server(
    db_url: str, data_dir: Path, *, stale_after: float, slots: int = 3
) -> Iterator[Server]:
    settings = Settings(
        data_dir=data_dir,
        database_url=db_url,
        grpc_address="127.0.0.1:0",
        stale_after_seconds=stale_after,
        reap_interval_seconds=REAP_INTERVAL,
        tenant_slots=slots,
        jwt_secret=SECRET,
        grpc_max_workers=16,
        metrics_address="127.0.0.1:0",  # never the default port, which another server may hold
        rate_limits=UNLIMITED_RATES,
    )
    server = Server(build(settings), secret=SECRET)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0)


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    """On SQLite and PostgreSQL in turn, with a 2 s stale threshold."""
    with running_server(db_url, tmp_path, stale_after=2.0) as running:
        yield running


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An empty store in a SQLite file (the timing tests need one engine only)."""
    url = f"sqlite:///{tmp_path / 'runsvc.db'}"
    engine = make_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    return url


def address(server: Server) -> str:
    return f"127.0.0.1:{server.port}"
