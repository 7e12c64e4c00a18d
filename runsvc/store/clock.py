"""The database's clock: replicas agree on time because they all ask PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from runsvc.store.dialects import dialect


class DatabaseClock:
    def now(self, session: Any) -> datetime:
        return dialect(session).now(session)
