"""Engines and transactions (the statements that differ live in :mod:`runsvc.store.dialects`).

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
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from runsvc import deadline
from runsvc.errors import Unavailable
from runsvc.store.dialects import TRANSACTION_NOW
from runsvc.store.watchdog import Watchdog
from runsvc.trust import TrustTracker

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL SQLSTATEs for a transaction that lost a race and can simply run again.
_RETRYABLE_PG_CODES = frozenset({"40001", "40P01"})
_MAX_ATTEMPTS = 8
# How long before a call's deadline the watchdog cuts a connection that has not answered.
_WATCHDOG_MARGIN = 0.05

# query_canceled: the call's own deadline ran out; the database answered.
_NOT_AN_OUTAGE_PG_CODES = frozenset({"57014"})
# The statement timeout a connection's session holds now (milliseconds), in its ``info``.
_SESSION_TIMEOUT = "runsvc.session_statement_timeout_ms"
# The steps a read's statement timeout is rounded down to, so that calls with like deadlines
# share one and a pooled connection rarely needs another SET (milliseconds).
_TIMEOUT_STEPS_MS = (30_000, 20_000, 10_000, 5_000, 2_000, 1_000, 500, 200, 100)
OUTAGE_LOG_SECONDS = 5.0


def make_engine(url: str, *, max_connections: int = 20) -> Engine:
    """An engine for ``url`` with the settings this service relies on.

    It opens ``max_connections`` connections at most: half kept in the pool, the rest
    opened under load and closed when returned (docs/capacity.md sizes it per process).
    A PostgreSQL engine is in autocommit: transactions are :meth:`Database.run`'s, which
    spells them out; ``engine.begin()`` on it begins none.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    kept = max(1, max_connections // 2)
    engine = create_engine(
        url,
        pool_size=kept,
        max_overflow=max(0, max_connections - kept),
        # No pre-ping: it runs before the watchdog can guard the connection and
        # would hang on a partition. A lost connection fails its one call and
        # invalidates the whole pool, so the next call connects afresh.
        pool_pre_ping=False,
        pool_timeout=10,
        connect_args={"connect_timeout": 3} if parsed.get_driver_name() == "psycopg2" else {},
        # Database spells its transactions out (BEGIN with its first statement, one
        # round trip saved): the driver must not begin one of its own.
        isolation_level="AUTOCOMMIT",
    )
    if parsed.get_driver_name() == "psycopg2":

        @event.listens_for(engine, "do_connect")
        def _bounded_connect(_dialect: Any, _record: Any, _args: Any, params: Any) -> None:
            # Connecting within the call's deadline; libpq's shortest timeout is 2 s.
            left = deadline.remaining()
            if left is not None:
                params["connect_timeout"] = max(2, min(3, int(left)))

    return engine


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


def _timeout_step(seconds: float) -> int:
    """The largest step not above ``seconds`` (in milliseconds; at least 1)."""
    wanted = int(seconds * 1000)
    return next((step for step in _TIMEOUT_STEPS_MS if step <= wanted), max(1, wanted))


def _retryable(error: sa_exc.DBAPIError) -> bool:
    code = getattr(error.orig, "pgcode", None)
    if code in _RETRYABLE_PG_CODES:
        return True
    return "database is locked" in str(error.orig)


class Database:
    """Runs units of work in transactions, retrying those that lost a race."""

    def __init__(self, engine: Engine, *, bound_seconds: float = 30.0) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        # Work outside a call (the reaper, heartbeat batches) is bounded by this.
        self.bound_seconds = bound_seconds
        self.watchdog = Watchdog()
        # Any failure to reach the database resets it; Context marks the regain.
        self.trust = TrustTracker()
        # The driver's reason for an outage is logged at most this often (every call fails).
        self._outage_logged_at = -OUTAGE_LOG_SECONDS
        self._outages_unlogged = 0

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        if self._postgres:
            with self._begin_postgres() as conn:
                yield conn
            return
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _guarded(self) -> Iterator[tuple[Connection, float]]:
        """A pooled PostgreSQL connection and the seconds this work may take: the call's
        deadline (capped), or the store's own bound outside a call. The watchdog cuts the
        connection a little before that if the server cannot answer; the statement timeout
        the caller sets comes first."""
        left = deadline.remaining()
        bound = self.bound_seconds if left is None else min(left, self.bound_seconds)
        token: int | None = None
        with self.engine.connect() as conn:
            try:
                token = self.watchdog.arm(
                    conn.connection.dbapi_connection, max(0.05, bound - _WATCHDOG_MARGIN)
                )
                yield conn, bound - 2 * _WATCHDOG_MARGIN
            finally:
                if token is not None:
                    self.watchdog.disarm(token)
                # info outlives the checkout: the next transaction reads its own clock.
                with suppress(sa_exc.SQLAlchemyError):
                    conn.info.pop(TRANSACTION_NOW, None)

    @contextmanager
    def _begin_postgres(self) -> Iterator[Connection]:
        """A transaction whose first round trip also begins it, bounds it and reads its clock.

        The driver would send BEGIN on its own round trip before the first statement;
        here the connection is in autocommit and the transaction is spelled out, so
        ``BEGIN; SELECT now(), set_config(…)`` is one round trip, and so is COMMIT.
        """
        with self._guarded() as (conn, seconds):
            timeout = max(1, int(seconds * 1000))
            # The transaction's clock, which every use case asks for next (DatabaseClock).
            conn.info[TRANSACTION_NOW] = conn.exec_driver_sql(
                f"BEGIN; SELECT now(), set_config('statement_timeout', '{timeout}', true)"
            ).scalar_one()
            try:
                yield conn
            except BaseException:
                with suppress(sa_exc.SQLAlchemyError):
                    conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")

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
                self._raise_as_seen(error)
            except sa_exc.TimeoutError as error:
                raise self._pool_exhausted() from error
        raise AssertionError("unreachable")  # pragma: no cover

    def read(self, work: Callable[[Connection], T]) -> T:
        """Run a read of one statement without a transaction around it, where that saves round
        trips: on PostgreSQL the statement alone (the call's bound is the session's statement
        timeout, set only when it changes by a whole step, see :func:`_timeout_step`); on
        SQLite an ordinary transaction. ``work`` must only read."""
        if not self._postgres:
            return self.run(work)
        try:
            with self._guarded() as (conn, seconds):
                step = _timeout_step(seconds)
                if conn.info.get(_SESSION_TIMEOUT) != step:
                    conn.info.pop(_SESSION_TIMEOUT, None)  # unknown until the SET is done
                    conn.exec_driver_sql(f"SET statement_timeout = {step}")
                    conn.info[_SESSION_TIMEOUT] = step
                return work(conn)
        except sa_exc.DBAPIError as error:
            self._raise_as_seen(error)
        except sa_exc.TimeoutError as error:
            raise self._pool_exhausted() from error

    def _raise_as_seen(self, error: sa_exc.DBAPIError) -> NoReturn:
        """``error`` as the caller sees it: an outage is Unavailable, anything else itself."""
        outage = self._outage(error)
        if outage is None:
            raise error
        raise outage from error

    def _pool_exhausted(self) -> Unavailable:
        # No connection to be had: heartbeats cannot be recorded either.
        self.trust.failed()
        return Unavailable("the store's connection pool is exhausted")

    def _outage(self, error: sa_exc.DBAPIError) -> Unavailable | None:
        """The outage a failed database call is, for the caller; None when it is none (a
        programming error stays what it is)."""
        if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            if getattr(error.orig, "pgcode", None) not in _NOT_AN_OUTAGE_PG_CODES:
                self.trust.failed()
            # The driver's words (hosts, roles, databases) stay in this log:
            # callers, browsers included, learn only that the store is down.
            self._log_outage(error)
            return Unavailable("the store is unavailable")
        return None

    def _log_outage(self, error: sa_exc.DBAPIError) -> None:
        now = time.monotonic()
        if now - self._outage_logged_at < OUTAGE_LOG_SECONDS:
            self._outages_unlogged += 1  # racy by one at worst: a count, not a guarantee
            return
        self._outage_logged_at = now
        log.warning(
            "the store is unavailable",
            extra={"error": str(error.orig), "unlogged_since": self._outages_unlogged},
        )
        self._outages_unlogged = 0

    def dispose(self) -> None:
        self.watchdog.stop()
        self.engine.dispose()
