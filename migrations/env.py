"""Alembic environment for runsvc, used without an alembic.ini.

The database URL is, in order: the ``sqlalchemy.url`` option of the Alembic
config, the ``RUNSVC_DATABASE_URL`` environment variable, then the embedded
default ``sqlite:///data/runsvc.db``. A caller may hand over an open
connection in ``config.attributes["connection"]``; it is then used as is.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy import pool
from sqlalchemy.engine import Connection, make_url

from runsvc.store.schema import UtcDateTime, metadata

DEFAULT_URL = "sqlite:///data/runsvc.db"

config = context.config
target_metadata = metadata


def database_url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("RUNSVC_DATABASE_URL")
        or DEFAULT_URL
    )


def compare_type(
    ctx: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_type: sa.types.TypeEngine[Any],
    metadata_type: sa.types.TypeEngine[Any],
) -> bool | None:
    """``UtcDateTime`` is stored as ``DateTime(timezone=True)``: equal to what that reflects as."""
    if not isinstance(metadata_type, UtcDateTime):
        return None
    if not isinstance(inspected_type, sa.DateTime):
        return True
    # SQLite has no time zone type; PostgreSQL must hold TIMESTAMP WITH TIME ZONE.
    return ctx.dialect.name == "postgresql" and not inspected_type.timezone


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Write ``UtcDateTime`` columns as ``sa.DateTime(timezone=True)`` in new revisions."""
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


# Tables runsvc shares a database with but does not own: the monolith's, which
# `runsvc migrate --adopt-seed` reads and never changes.
FOREIGN_TABLES = frozenset({"outbound_call_runs", "outbound_call_jobs"})


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name in FOREIGN_TABLES)


def configure_options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        "compare_type": compare_type,
        "render_item": render_item,
        "include_name": include_name,
        "render_as_batch": dialect_name == "sqlite",
    }


def run_migrations_offline() -> None:
    """Write the SQL to the output buffer instead of running it (``--sql``)."""
    url = make_url(database_url())
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **configure_options(url.get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_with_connection(connection: Connection) -> None:
    context.configure(connection=connection, **configure_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with_connection(connection)
        return
    engine = sa.create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_with_connection(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
