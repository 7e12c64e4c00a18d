"""The slot-release outbox: rows written with the state change, deleted once applied.

``tenant_id=None`` means every tenant, as the relay and the metrics need.
A relay claims the rows it applies (:func:`claim`), so two replicas never
apply one row at once; a claim expires, so the rows of a relay that died are
taken by another. Applying a release twice is harmless (it removes exact slot
names), so a claim that outlived its time costs a repeat, never a loss; the
one delete that returns a row counts it as applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    ColumnElement,
    Connection,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from runsvc.store.dialects import dialect
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


def claim(
    conn: Connection,
    *,
    tenant_id: str | None,
    holder: str,
    now: datetime,
    until: datetime,
    limit: int,
    ids: Sequence[int] | None = None,
) -> list[PendingRelease]:
    """Pending releases nobody else is applying, oldest first, now ``holder``'s until ``until``.

    One guarded UPDATE over the rows it locks (skipping rows that a
    concurrent claim holds): two relays claiming at once get disjoint rows.
    """
    free = or_(slot_releases.c.claimed_until.is_(None), slot_releases.c.claimed_until <= now)
    chosen = select(slot_releases.c.id).where(_scoped(tenant_id), free)
    if ids is not None:
        chosen = chosen.where(slot_releases.c.id.in_(ids))
    chosen = dialect(conn).claiming(
        chosen.order_by(slot_releases.c.id).limit(limit), of=slot_releases
    )
    rows = conn.execute(
        update(slot_releases)
        .where(slot_releases.c.id.in_(chosen), free)
        .values(claimed_by=holder, claimed_until=until)
        .returning(*slot_releases.c)
    ).all()
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
        for r in sorted(rows, key=lambda r: r.id)
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
    conn: Connection, ids: Sequence[int], *, tenant_id: str | None, holder: str, error: str
) -> None:
    """Count a failed attempt and free ``holder``'s claims, so that any relay may retry."""
    if ids:
        conn.execute(
            update(slot_releases)
            .where(
                slot_releases.c.id.in_(ids),
                _scoped(tenant_id),
                slot_releases.c.claimed_by == holder,
            )
            .values(
                attempts=slot_releases.c.attempts + 1,
                last_error=error[:1000],
                claimed_by=None,
                claimed_until=None,
            )
        )


def backlog(conn: Connection, *, tenant_id: str | None) -> Backlog:
    row = conn.execute(
        select(func.count(), func.min(slot_releases.c.created_at)).where(_scoped(tenant_id))
    ).one()
    # MIN() keeps the column's type, so the time comes back aware UTC on every engine.
    return Backlog(int(row[0]), row[1])
