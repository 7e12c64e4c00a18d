"""The few statements that differ between SQLite and PostgreSQL, in one place.

Query code asks ``dialect(conn)`` for them and never names an engine. SQLite is
the embedded default: one process, whose transactions all begin IMMEDIATE (see
:mod:`runsvc.store.engine`), so it needs no row locks; PostgreSQL is shared by
replicas. Engine set-up and transactions stay in :mod:`runsvc.store.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    FromClause,
    Select,
    Table,
    Update,
    bindparam,
    cast,
    column,
    func,
    select,
    text,
    values,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ColumnElement

S = TypeVar("S", bound=Select[Any])

# Where a transaction that already read PostgreSQL's now() keeps it, in
# ``Connection.info`` (the engine reads it with the statement timeout).
TRANSACTION_NOW = "runsvc.transaction_now"


class Dialect:
    """SQLite's statements; :class:`Postgres` overrides those that differ."""

    # Whether the database takes a LATERAL join (a run and its counts in one statement).
    lateral = False

    def now(self, conn: Connection) -> datetime:
        # SQLite has one host, so its clock is this process's clock.
        return datetime.now(UTC)

    def insert(self, table: Table) -> Any:
        """An INSERT that takes ``on_conflict_do_update``."""
        return sqlite.insert(table)

    def claiming(self, query: S, *, of: FromClause) -> S:
        """``query`` locking the rows of ``of`` it reads until the transaction ends,
        skipping rows another transaction holds: concurrent replicas take disjoint
        batches. SQLite needs nothing: its transaction already holds the one write lock."""
        return query

    def epoch_seconds(self, moment: ColumnElement[Any]) -> ColumnElement[Any]:
        """Seconds since the epoch of ``moment``, in the engine's own arithmetic."""
        # SQLite keeps UTC text; julianday() reads it.
        return (func.julianday(moment) - 2440587.5) * 86400.0

    def with_rows(
        self,
        name: str,
        kinds: Mapping[str, Any],
        rows: Sequence[tuple[Any, ...]],
        build: Callable[[Any], Executable],
    ) -> tuple[Executable, dict[str, Any]]:
        """``build(table)`` where ``table`` is ``rows`` as a table ``name(<kinds>)``, and
        the parameters to execute it with."""
        given = values(*(column(key, kind) for key, kind in kinds.items()), name=name)
        # A CTE rather than FROM (VALUES …) AS v(…): SQLite takes only this form.
        return build(given.data(rows).cte(name)), {}

    def count_changed(self, conn: Connection, change: Update, by: ColumnElement[Any]) -> dict:
        """Run ``change`` and count the rows it changed, per value of ``by``."""
        counts: dict[Any, int] = {}
        for (key,) in conn.execute(change.returning(by)):
            counts[key] = counts.get(key, 0) + 1
        return counts

    def move_sequence_past(self, conn: Connection, sequence: str, top: int) -> None:
        """Make ``sequence`` give numbers above ``top`` (SQLite numbers from the table)."""


class Postgres(Dialect):
    lateral = True

    def __init__(self) -> None:
        self._built: dict[tuple[str, Callable[[Any], Executable]], Executable] = {}

    def now(self, conn: Connection) -> datetime:
        # now() is the transaction's start, so a reading taken earlier in this
        # transaction (with its statement timeout) is the same value, without a round trip.
        value: datetime = (
            conn.info.get(TRANSACTION_NOW) or conn.execute(text("SELECT now()")).scalar_one()
        )
        return value.astimezone(UTC)

    def insert(self, table: Table) -> Any:
        return postgresql.insert(table)

    def claiming(self, query: S, *, of: FromClause) -> S:
        return query.with_for_update(skip_locked=True, of=of)

    def epoch_seconds(self, moment: ColumnElement[Any]) -> ColumnElement[Any]:
        return func.extract("epoch", moment)

    def with_rows(
        self,
        name: str,
        kinds: Mapping[str, Any],
        rows: Sequence[tuple[Any, ...]],
        build: Callable[[Any], Executable],
    ) -> tuple[Executable, dict[str, Any]]:
        # One array per column through unnest: the statement is the same for any number
        # of rows, so it is built once and its compiled form cached (building a VALUES
        # list anew, and its cache key, cost more than the write).
        statement = self._built.get((name, build))
        if statement is None:
            table = (
                func.unnest(
                    *(
                        cast(bindparam(f"{name}_{key}"), postgresql.ARRAY(k))
                        for key, k in kinds.items()
                    )
                )
                .table_valued(*kinds)
                .render_derived(name=name)
            )
            statement = self._built[(name, build)] = build(table)
        arrays = {f"{name}_{key}": [row[i] for row in rows] for i, key in enumerate(kinds)}
        return statement, arrays

    def count_changed(self, conn: Connection, change: Update, by: ColumnElement[Any]) -> dict:
        # Counted by the database: no row per changed row comes back.
        done = change.returning(by.label("key")).cte("changed")
        return dict(conn.execute(select(done.c.key, func.count()).group_by(done.c.key)).all())

    def move_sequence_past(self, conn: Connection, sequence: str, top: int) -> None:
        conn.execute(
            text(
                f"SELECT setval('{sequence}', greatest(:top, (SELECT last_value FROM {sequence})))"
            ),
            {"top": top},
        )


_DIALECTS: dict[str, Dialect] = {"sqlite": Dialect(), "postgresql": Postgres()}


def dialect(conn: Connection) -> Dialect:
    return _DIALECTS[conn.dialect.name]
