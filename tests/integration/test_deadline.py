"""The call's deadline bounds every PostgreSQL statement of its transaction."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from sqlalchemy import Connection

from runsvc import deadline
from runsvc.errors import Unavailable
from runsvc.store.clock import DatabaseClock
from runsvc.store.engine import Database, make_engine


def _timeout(conn: Connection) -> str:
    return str(conn.exec_driver_sql("SHOW statement_timeout").scalar())


def _milliseconds(shown: str) -> float:
    return float(shown[:-2]) if shown.endswith("ms") else float(shown[:-1]) * 1000


@pytest.mark.postgres
def test_the_deadline_becomes_the_statement_timeout(postgres_url: str) -> None:
    db = Database(make_engine(postgres_url, max_connections=2))
    try:
        # Outside a call (the reaper, heartbeat batches): the store's own bound.
        assert db.bound_seconds * 1000 - 500 < _milliseconds(db.run(_timeout)) < 1000 * 30
        with deadline.bound(time.monotonic() + 2.0):
            assert 0 < _milliseconds(db.run(_timeout)) <= 2000
            with pytest.raises(Unavailable):
                db.run(lambda conn: conn.exec_driver_sql("SELECT pg_sleep(5)"))
        with db.engine.connect() as conn:
            assert _timeout(conn) == "0"  # SET LOCAL ended with its transaction
    finally:
        db.dispose()


@pytest.mark.postgres
def test_the_clock_read_with_the_bound_is_the_transactions_own(postgres_url: str) -> None:
    """The bound's round trip also reads now(); the clock reuses it in that transaction only."""
    db = Database(make_engine(postgres_url, max_connections=2))  # one connection: reused each time
    clock = DatabaseClock()

    def readings(conn: Connection) -> tuple[datetime, datetime]:
        return clock.now(conn), conn.exec_driver_sql("SELECT now()").scalar_one()

    with deadline.bound(time.monotonic() + 10.0):
        first, first_server = db.run(readings)
        time.sleep(0.01)
        second, second_server = db.run(readings)
    try:
        assert first == first_server and second == second_server
        assert second > first  # the reading did not outlive its transaction
        untimed, untimed_server = db.run(readings)  # no deadline: read on demand
        assert untimed == untimed_server > second
    finally:
        db.dispose()
