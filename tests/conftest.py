"""Fixtures for every tier: real SQLite files and a real PostgreSQL database.

PostgreSQL comes from ``RUNSVC_TEST_DATABASE_URL`` (default: the local
``test`` database with trust auth). Each test session creates a database of
its own and drops it at the end. When PostgreSQL cannot be reached the tests
that need it are skipped, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from runsvc.clock import FakeClock
from runsvc.domain import LivenessPolicy
from runsvc.service import Caller, RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import metadata

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() == "true"

BACKEND = Caller(subject="test-backend", role="backend")
WORKER = Caller(subject="test-worker", role="worker")


def pg_base_url() -> str:
    return os.environ.get("RUNSVC_TEST_DATABASE_URL", DEFAULT_PG_URL)


def require_service(name: str, error: Exception) -> None:
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a database test is never skipped)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    base = make_url(pg_base_url())
    name = f"runsvc_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        admin.dispose()
        require_service("PostgreSQL", error)
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE runs, jobs, audit_events RESTART IDENTITY CASCADE"))
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
