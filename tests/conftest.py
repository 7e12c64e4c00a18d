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
from contextlib import contextmanager

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from runsvc.clock import FakeClock
from runsvc.domain import LivenessPolicy
from runsvc.service import Caller, RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import metadata
from tests.redis_process import REDIS_SERVER, RedisProcess

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
IN_CI = os.environ.get("CI", "").lower() == "true"

# For test servers: the per-tenant rate limits out of reach. A test's load must not depend
# on how fast the machine sends it against a limit that test does not test; the tests of
# the limits themselves set theirs.
UNLIMITED_RATES = {name: (1e6, 1e6) for name in ("read", "write", "worker", "heartbeat")}

BACKEND = Caller(subject="test-backend", role="backend")
WORKER = Caller(subject="test-worker", role="worker")


def pg_base_url() -> str:
    return os.environ.get("RUNSVC_TEST_DATABASE_URL", DEFAULT_PG_URL)


def require_service(name: str, error: Exception) -> None:
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a database test is never skipped)")
    pytest.skip(message)


@contextmanager
def private_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database named after ``prefix``, dropped afterwards."""
    base = make_url(pg_base_url())
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        admin.dispose()
        require_service("PostgreSQL", error)
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    with private_database("runsvc_test") as url:
        engine = create_engine(url)
        metadata.create_all(engine)
        engine.dispose()
        yield url


TABLES = "runs, jobs, audit_events, slot_releases, leases"


def _truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()


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
    url = request.getfixturevalue("postgres_url")
    _truncate(url)
    return url


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
