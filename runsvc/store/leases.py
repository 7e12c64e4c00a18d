"""Leases on once-per-interval jobs: whose turn it is to run the next pass.

Taking a lease is one guarded upsert: it inserts the job's row, or takes the
row over only when it has expired; otherwise it changes nothing and the
caller skips its pass. Times are the database's (the
clock seam), so replicas whose clocks drift still agree on when a lease ends.
Leases are fleet-wide, like the jobs they guard: no tenant scope.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, update

from runsvc.store.dialects import dialect
from runsvc.store.schema import leases


def take(conn: Connection, name: str, *, holder: str, now: datetime, until: datetime) -> bool:
    """Hold lease ``name`` until ``until`` if nobody holds it at ``now``.

    Not even its holder takes it again before it expires: one turn per
    interval, however often a replica asks (a holder asks again only after a
    pass and an interval's wait, so it finds its own lease expired).
    """
    upsert = dialect(conn).insert(leases)
    statement = (
        upsert.values(name=name, holder=holder, expires_at=until)
        .on_conflict_do_update(
            index_elements=[leases.c.name],
            set_={"holder": upsert.excluded.holder, "expires_at": upsert.excluded.expires_at},
            where=leases.c.expires_at <= now,
        )
        .returning(leases.c.name)
    )
    return conn.execute(statement).one_or_none() is not None


def give_up(conn: Connection, name: str, *, holder: str, now: datetime) -> bool:
    """End ``holder``'s lease on ``name`` now, so that any replica may take it at once."""
    result = conn.execute(
        update(leases)
        .where(leases.c.name == name, leases.c.holder == holder, leases.c.expires_at > now)
        .values(expires_at=now)
    )
    return result.rowcount == 1


def holder(conn: Connection, name: str, *, now: datetime) -> str | None:
    """Who holds lease ``name`` at ``now``; None when nobody does."""
    return conn.execute(
        leases.select()
        .with_only_columns(leases.c.holder)
        .where(leases.c.name == name, leases.c.expires_at > now)
    ).scalar_one_or_none()
