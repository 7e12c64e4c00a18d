"""Run numbers: a short, unique, increasing integer per run, assigned by the database.

Existing runs are numbered here. A run adopted from the monolith (its id is
the monolith's run id under the adoption namespace) gets the monolith's id,
so the monolith's URLs keep naming it; every other run follows in creation
order above the largest of those. On PostgreSQL the numbers of new runs come
from the sequence ``runs_number_seq``, set past every number given here; on
SQLite the insert takes one above the largest number (runsvc.store.schema).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 00:00:00
"""

import re
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQUENCE = "runs_number_seq"
# The adoption namespace (runsvc.store.adopt), frozen here as this revision saw it.
SEED_NAMESPACE = uuid.UUID("0b6f4a52-6d2b-4f0e-9a51-6a3b0b6a7f14")
SEED_REQUEST = re.compile(r"seed-run-(\d+)")


def _numbers(conn: sa.Connection) -> list[dict[str, object]]:
    """(id, number) for every existing run: adopted ones first by their monolith id."""
    rows = conn.execute(sa.text("SELECT id, request_id FROM runs ORDER BY created_at, id")).all()
    numbered: list[dict[str, object]] = []
    rest = []
    for run_id, request_id in rows:
        match = SEED_REQUEST.fullmatch(request_id)
        seed_id = int(match.group(1)) if match else None
        if seed_id is not None and run_id == str(
            uuid.uuid5(SEED_NAMESPACE, f"outbound_call_runs/{seed_id}")
        ):
            numbered.append({"run_id": run_id, "number": seed_id})
        else:
            rest.append(run_id)
    top = max((int(str(n["number"])) for n in numbered), default=0)
    numbered += [{"run_id": run_id, "number": top + i} for i, run_id in enumerate(rest, 1)]
    return numbered


def _number_in_sql(postgres: bool) -> None:
    """For ``migrate --sql``: a script cannot recompute adoption ids, so it numbers every run
    in creation order; run this revision online to keep adopted runs' monolith ids."""
    op.execute(
        "UPDATE runs SET number = (SELECT n.number FROM (SELECT id, row_number() OVER "
        "(ORDER BY created_at, id) AS number FROM runs) AS n WHERE n.id = runs.id)"
    )
    if postgres:
        op.execute(
            f"SELECT setval('{SEQUENCE}', (SELECT max(number) FROM runs)) "
            "WHERE EXISTS (SELECT 1 FROM runs)"
        )


def upgrade() -> None:
    postgres = op.get_context().dialect.name == "postgresql"
    if postgres:
        op.execute(sa.schema.CreateSequence(sa.Sequence(SEQUENCE)))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("number", sa.BigInteger(), nullable=True))
    if context.is_offline_mode():
        _number_in_sql(postgres)
    else:
        conn = op.get_bind()
        numbered = _numbers(conn)
        if numbered:
            conn.execute(sa.text("UPDATE runs SET number = :number WHERE id = :run_id"), numbered)
            if postgres:
                top = max(int(str(n["number"])) for n in numbered)
                conn.execute(sa.text("SELECT setval(:seq, :top)"), {"seq": SEQUENCE, "top": top})
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("number", existing_type=sa.BigInteger(), nullable=False)
        batch.create_index("uq_runs_number", ["number"], unique=True)
    if postgres:
        # Rows inserted by plain SQL are numbered too.
        op.execute(f"ALTER TABLE runs ALTER COLUMN number SET DEFAULT nextval('{SEQUENCE}')")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("uq_runs_number")
        batch.drop_column("number")
    if op.get_context().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence(SEQUENCE)))
