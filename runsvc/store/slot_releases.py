"""The slot-release outbox: rows written with the state change, deleted once applied.

``tenant_id=None`` means every tenant, as the relay and the metrics need.
Applying a release twice is harmless (it removes exact slot names), so
replicas may race on a row; whoever deletes it counts it as applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, delete, func, insert, literal, select, update

from runsvc.store.schema import slot_releases


@dataclass(frozen=True)
class PendingRelease:
    id: int
    tenant_id: str
    run_id: str | None
    cause: str
    members: list[str]
    created_at: datetime
    attempts: int


@dataclass(frozen=True)
class Backlog:
    count: int
    oldest: datetime | None


def _scoped(tenant_id: str | None) -> ColumnElement[bool]:
    return slot_releases.c.tenant_id == tenant_id if tenant_id is not None else literal(True)


def add(
    conn: Connection,
    *,
    tenant_id: str,
    run_id: str | None,
    cause: str,
    members: Sequence[str],
    now: datetime,
) -> int:
    return int(
        conn.execute(
            insert(slot_releases)
            .values(
                tenant_id=tenant_id,
                run_id=run_id,
                cause=cause,
                members="\n".join(members),
                created_at=now,
                attempts=0,
            )
            .returning(slot_releases.c.id)
        ).scalar_one()
    )


def pending(
    conn: Connection, *, tenant_id: str | None, limit: int, ids: Sequence[int] | None = None
) -> list[PendingRelease]:
    """Pending releases, oldest first."""
    query = select(slot_releases).where(_scoped(tenant_id))
    if ids is not None:
        query = query.where(slot_releases.c.id.in_(ids))
    rows = conn.execute(query.order_by(slot_releases.c.id).limit(limit))
    return [
        PendingRelease(
            r.id,
            r.tenant_id,
            r.run_id,
            r.cause,
            [m for m in r.members.split("\n") if m],
            r.created_at,
            r.attempts,
        )
        for r in rows
    ]


def remove(conn: Connection, ids: Sequence[int], *, tenant_id: str | None) -> set[int]:
    """Delete applied releases; the ids this call deleted (another replica may have first)."""
    if not ids:
        return set()
    rows = conn.execute(
        delete(slot_releases)
        .where(slot_releases.c.id.in_(ids), _scoped(tenant_id))
        .returning(slot_releases.c.id)
    )
    return {r.id for r in rows}


def note_failure(
    conn: Connection, ids: Sequence[int], *, tenant_id: str | None, error: str
) -> None:
    if ids:
        conn.execute(
            update(slot_releases)
            .where(slot_releases.c.id.in_(ids), _scoped(tenant_id))
            .values(attempts=slot_releases.c.attempts + 1, last_error=error[:1000])
        )


def backlog(conn: Connection, *, tenant_id: str | None) -> Backlog:
    row = conn.execute(
        select(func.count(), func.min(slot_releases.c.created_at)).where(_scoped(tenant_id))
    ).one()
    # MIN() keeps the column's type, so the time comes back aware UTC on every engine.
    return Backlog(int(row[0]), row[1])
