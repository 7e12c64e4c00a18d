"""PostgreSQL for the tests: where it is, a private database, an empty store.

PostgreSQL comes from ``RUNSVC_TEST_DATABASE_URL`` (default: the local ``test`` database with
trust auth). A service that cannot be reached skips the tests that need it, except under
``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() == "true"
TABLES = "runs, jobs, audit_events, slot_releases, leases"


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


def truncate(url: str) -> None:
    """Empty every table of the store at ``url`` (a database a whole session shares)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()
