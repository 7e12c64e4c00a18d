"""The database's clock: replicas agree on time because they all ask PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from runsvc.store.engine import TRANSACTION_NOW


class DatabaseClock:
    def now(self, session: Any) -> datetime:
        if session.dialect.name == "postgresql":
            # now() is the transaction's start, so a reading taken earlier in
            # this transaction is the same value without another round trip.
            value: datetime = (
                session.info.get(TRANSACTION_NOW)
                or session.execute(text("SELECT now()")).scalar_one()
            )
            return value.astimezone(UTC)
        # SQLite has one host, so its clock is this process's clock.
        return datetime.now(UTC)
