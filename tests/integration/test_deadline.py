"""The call's deadline bounds every PostgreSQL statement of its transaction."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Connection

from runsvc import deadline
from runsvc.errors import Unavailable
from runsvc.store.engine import Database, make_engine


def _timeout(conn: Connection) -> str:
    return str(conn.exec_driver_sql("SHOW statement_timeout").scalar())


@pytest.mark.postgres
def test_the_deadline_becomes_the_statement_timeout(postgres_url: str) -> None:
    db = Database(make_engine(postgres_url, pool_size=1))
    try:
        assert db.run(_timeout) == "0"  # outside a call: no bound
        token = deadline.set(time.monotonic() + 2.0)
        try:
            bound = db.run(_timeout)
            assert bound.endswith("ms") or bound.endswith("s")
            with pytest.raises(Unavailable):
                db.run(lambda conn: conn.exec_driver_sql("SELECT pg_sleep(5)"))
        finally:
            deadline.reset(token)
        assert db.run(_timeout) == "0"  # SET LOCAL ended with its transaction
    finally:
        db.dispose()
