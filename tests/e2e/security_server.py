"""A real server configured the way a production deployment would be: ES256 and HS256
tokens with issuer and audience, on each store engine; plus helpers to read its rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jwt
from sqlalchemy import create_engine, select

from runsvc.server import Server, build
from runsvc.settings import Settings
from runsvc.store.schema import audit_events, jobs, runs
from tests.conftest import UNLIMITED_RATES
from tests.keys import claims, ec_key, public_pem

SECRET = "security-secret-that-is-long-enough-for-hs256"
ISSUER = "https://idp.test"
AUDIENCE = "runsvc"
SIGNING_KEY = ec_key()

Metadata = list[tuple[str, str]]


def bearer(token: str) -> Metadata:
    return [("authorization", f"Bearer {token}")]


def es256(
    role: str, tenant: str | None = None, *, subject: str | None = None, **extra: Any
) -> Metadata:
    body = claims(role, tenant, subject=subject, iss=ISSUER, aud=AUDIENCE, **extra)
    return bearer(jwt.encode(body, SIGNING_KEY, algorithm="ES256"))


def settings_for(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    key_file = tmp_path / "jwt-public.pem"
    key_file.write_text(public_pem(SIGNING_KEY))
    base = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        grpc_address="127.0.0.1:0",
        stale_after_seconds=120,
        startup_cleanup_after_seconds=600,
        reap_interval_seconds=60,
        tenant_slots=3,
        jwt_secret=SECRET,
        jwt_algorithms=("HS256", "ES256"),
        jwt_public_key_file=key_file,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        grpc_max_workers=8,
        audit_aggregate_seconds=0.2,
        metrics_address="127.0.0.1:0",  # never the default port, which another server may hold
        rate_limits=UNLIMITED_RATES,
    )
    return replace(base, **overrides)


@contextmanager
def serving(settings: Settings) -> Iterator[Server]:
    server = Server(build(settings), secret=settings.jwt_secret)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0)


@contextmanager
def plain_channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


def snapshot(db_url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every row of runs and jobs: what no refused call may change."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return (
                [tuple(r) for r in conn.execute(select(runs).order_by(runs.c.id))],
                [tuple(r) for r in conn.execute(select(jobs).order_by(jobs.c.id))],
            )
    finally:
        engine.dispose()


def audit_rows(db_url: str) -> list[dict[str, Any]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [
                r._asdict() for r in conn.execute(select(audit_events).order_by(audit_events.c.id))
            ]
    finally:
        engine.dispose()


def missing_id() -> str:
    return str(uuid.uuid4())
