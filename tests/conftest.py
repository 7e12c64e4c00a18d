"""Fixtures for every tier: real SQLite files, a real PostgreSQL database, real Redis.

PostgreSQL comes from ``RUNSVC_TEST_DATABASE_URL`` (default: the local
``test`` database with trust auth). Each test session creates a database of
its own and drops it at the end. When PostgreSQL cannot be reached the tests
that need it are skipped, except under ``CI=true``, where that is a failure.
Redis comes from ``RUNSVC_TEST_REDIS_URL`` (default the local server) with a
key prefix of its own per test, under the same rule; fault tests start a
dedicated ``redis-server`` of their own instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import create_engine

from runsvc.clock import FakeClock
from runsvc.domain import LivenessPolicy
from runsvc.service import Caller, RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import metadata
from tests.redis_process import REDIS_SERVER, RedisProcess
from tests.support.databases import private_database, require_service, truncate

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# For test servers: the per-tenant rate limits out of reach. A test's load must not depend
# on how fast the machine sends it against a limit that test does not test; the tests of
# the limits themselves set theirs.
UNLIMITED_RATES = {name: (1e6, 1e6) for name in ("read", "write", "worker", "heartbeat")}

BACKEND = Caller(subject="test-backend", role="backend")
WORKER = Caller(subject="test-worker", role="worker")


@pytest.fixture(scope="session")
def session_postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    with private_database("runsvc_test") as url:
        engine = create_engine(url)
        metadata.create_all(engine)
        engine.dispose()
        yield url


@pytest.fixture
def postgres_url(session_postgres_url: str) -> str:
    """The session's PostgreSQL database, emptied for this test: what a test finds there
    is its own, whatever ran before it (``make test-shuffled`` checks that it never leans
    on another test's leftovers)."""
    truncate(session_postgres_url)
    return session_postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URL of an empty, migrated store on each engine in turn."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("store") / "runsvc.db"
        url = f"sqlite:///{path}"
        engine = make_engine(url)
        metadata.create_all(engine)
        engine.dispose()
        return url
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    db = Database(make_engine(db_url))
    yield db
    db.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy() -> LivenessPolicy:
    return LivenessPolicy()


@pytest.fixture
def slot_limits() -> SlotLimits:
    return SlotLimits(default=3)


@pytest.fixture
def service(
    database: Database, clock: FakeClock, policy: LivenessPolicy, slot_limits: SlotLimits
) -> RunService:
    return RunService(db=database, clock=clock, slots=StoreSlots(slot_limits), policy=policy)


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("RUNSVC_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        require_service("Redis", error)
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"runsvc-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A dedicated redis-server process for this test (paused, killed, restarted at will)."""
    if not os.access(REDIS_SERVER, os.X_OK):
        require_service("redis-server", FileNotFoundError(REDIS_SERVER))
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()
