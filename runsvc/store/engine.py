"""Engines and transactions: the only place that knows SQLite from PostgreSQL.

SQLite (the embedded default) runs in WAL mode and opens every transaction
with ``BEGIN IMMEDIATE`` so that writers queue on ``busy_timeout`` instead of
failing on a lock upgrade; PostgreSQL runs at READ COMMITTED, where every
state change is a single guarded statement and needs nothing stronger.
Database errors become :mod:`runsvc.errors` here, and nowhere else.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from runsvc import deadline
from runsvc.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL SQLSTATEs for a transaction that lost a race and can simply run again.
_RETRYABLE_PG_CODES = frozenset({"40001", "40P01"})
_MAX_ATTEMPTS = 8


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine for ``url`` with the settings this service relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={"connect_timeout": 5} if parsed.get_driver_name() == "psycopg2" else {},
    )


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def is_postgres(conn_or_engine: Connection | Engine) -> bool:
    return conn_or_engine.dialect.name == "postgresql"


def _retryable(error: sa_exc.DBAPIError) -> bool:
    code = getattr(error.orig, "pgcode", None)
    if code in _RETRYABLE_PG_CODES:
        return True
    return "database is locked" in str(error.orig)


class Database:
    """Runs units of work in transactions, retrying those that lost a race."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            left = deadline.remaining()
            if left is not None and is_postgres(conn):
                # No statement of this call may outlive its (capped) deadline.
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}")
            yield conn

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one transaction; commit if it returns, roll back if it raises.

        A deadlock or serialization failure runs it again from the start, so
        ``work`` must do nothing outside the database.
        """
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with self._begin() as conn:
                    return work(conn)
            except sa_exc.DBAPIError as error:
                if _retryable(error) and attempt < _MAX_ATTEMPTS:
                    log.debug("transaction lost a race, retrying", extra={"attempt": attempt})
                    time.sleep(random.uniform(0, 0.005 * attempt))
                    continue
                if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
                    raise Unavailable(f"the store is unavailable: {error.orig}") from error
                raise
            except sa_exc.TimeoutError as error:
                raise Unavailable("the store's connection pool is exhausted") from error
        raise AssertionError("unreachable")  # pragma: no cover

    def dispose(self) -> None:
        self.engine.dispose()
