"""Adopting the monolith's database as it was before its migration 114 (no heartbeat column)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import pool

from runsvc import cli
from runsvc.clock import FakeClock
from runsvc.domain import JobSpec, LivenessPolicy
from runsvc.reaper import REAPER, Reaper
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store import adopt, migrate
from runsvc.store.engine import Database, make_engine
from tests.support.databases import private_database

# The monolith's tables before migration 114, as its models defined them (plain
# TIMESTAMP in UTC, denormalized counters on the run, statuses as text).
SEED_DDL = """
CREATE TABLE outbound_call_runs (
    id INTEGER PRIMARY KEY,
    business_id INTEGER NOT NULL,
    status VARCHAR(32) NOT NULL,
    total_leads INTEGER NOT NULL DEFAULT 0,
    queued_count INTEGER NOT NULL DEFAULT 0,
    in_progress_count INTEGER NOT NULL DEFAULT 0,
    completed_count INTEGER NOT NULL DEFAULT 0,
    failed_count INTEGER NOT NULL DEFAULT 0,
    concurrency INTEGER NOT NULL DEFAULT 3,
    locked_by_worker VARCHAR(128),
    lock_ts TIMESTAMP,
    last_error TEXT,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    started_at TIMESTAMP,
    ended_at TIMESTAMP
);
CREATE TABLE outbound_call_jobs (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES outbound_call_runs (id),
    business_id INTEGER NOT NULL,
    lead_id INTEGER,
    phone_number VARCHAR(32),
    status VARCHAR(32) NOT NULL,
    call_sid VARCHAR(64),
    error_message TEXT,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP,
    started_at TIMESTAMP,
    completed_at TIMESTAMP
);
"""

NOW = datetime(2026, 3, 1, 12, 0, 0)  # naive UTC, as the monolith stored it


def ago(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


# id, business, status, locked_by_worker, lock_ts, created_at, updated_at
SEED_RUNS = [
    (1, 1, "running", "w-old", ago(10), ago(60), ago(9)),  # heartbeat <- lock_ts
    (2, 1, "completed", None, None, ago(600), ago(500)),
    (3, 2, "pending", None, None, ago(5), None),  # heartbeat <- created_at
    (4, 2, "running", "w-2", ago(50), ago(55), ago(40)),  # older live run of business 2
    (5, 3, "running", "w-3", None, ago(30), ago(1)),  # heartbeat <- updated_at
    (6, 3, "stopped", None, None, ago(900), ago(890)),
    (7, 3, "cancelled", None, None, ago(800), ago(790)),
    (8, 5, "paused", None, None, ago(700), ago(690)),  # a status runsvc does not know
    (9, 4, "failed", None, None, ago(300), ago(200)),
]
# id, run, status
SEED_JOBS = [
    (1, 1, "completed"),
    (2, 1, "in_progress"),
    (3, 1, "queued"),
    (4, 1, "queued"),
    (5, 2, "completed"),
    (6, 2, "failed"),
    (7, 3, "queued"),
    (8, 4, "queued"),
    (9, 4, "dialing"),
    (10, 5, "calling"),
    (11, 9, "no_answer"),
    (12, 6, "queued"),
]


@pytest.fixture
def sqlite_seed_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'monolith.db'}"


@pytest.fixture
def postgres_seed_url() -> Iterator[str]:
    with private_database("runsvc_seed") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def seed_url(request: pytest.FixtureRequest) -> str:
    """A database holding the monolith's pre-114 tables and rows, nothing of runsvc."""
    url: str = request.getfixturevalue(f"{request.param}_seed_url")
    engine = sa.create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        for statement in filter(str.strip, SEED_DDL.split(";")):
            conn.exec_driver_sql(statement)
        for rid, business, status, worker, lock_ts, created, updated in SEED_RUNS:
            conn.execute(
                sa.text(
                    "INSERT INTO outbound_call_runs (id, business_id, status, locked_by_worker,"
                    " lock_ts, created_at, updated_at, queued_count, in_progress_count)"
                    " VALUES (:id, :b, :s, :w, :l, :c, :u, :q, :p)"
                ),
                {
                    "id": rid, "b": business, "s": status, "w": worker, "l": lock_ts,
                    "c": created, "u": updated,
                    "q": sum(1 for j in SEED_JOBS if j[1] == rid and j[2] == "queued"),
                    "p": sum(1 for j in SEED_JOBS if j[1] == rid and j[2] == "in_progress"),
                },
            )  # fmt: skip
        business_of = {r[0]: r[1] for r in SEED_RUNS}
        for jid, rid, status in SEED_JOBS:
            conn.execute(
                sa.text(
                    "INSERT INTO outbound_call_jobs (id, run_id, business_id, lead_id,"
                    " phone_number, status, created_at) VALUES (:id, :r, :b, :l, :p, :s, :c)"
                ),
                {
                    "id": jid, "r": rid, "b": business_of[rid], "l": 100 + jid,
                    "p": f"+97250000{jid:04d}", "s": status, "c": ago(70),
                },
            )  # fmt: skip
    engine.dispose()
    return url


def dump(url: str, *tables: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = sa.create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return {
                t: [tuple(r) for r in conn.exec_driver_sql(f"SELECT * FROM {t} ORDER BY id")]
                for t in tables
            }
    finally:
        engine.dispose()


def runs_by_seed_id(url: str) -> dict[int, dict[str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            from runsvc.store.schema import runs

            rows = {r.id: dict(r._mapping) for r in conn.execute(sa.select(runs))}
    finally:
        engine.dispose()
    return {seed_id: rows[adopt.run_uuid(seed_id)] for seed_id, *_ in SEED_RUNS}


def jobs_by_seed_id(url: str) -> dict[int, dict[str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            from runsvc.store.schema import jobs

            rows = {r.id: dict(r._mapping) for r in conn.execute(sa.select(jobs))}
    finally:
        engine.dispose()
    return {seed_id: rows[adopt.job_uuid(seed_id)] for seed_id, *_ in SEED_JOBS}


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def run_cli(monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> str:
    monkeypatch.setenv("RUNSVC_DATABASE_URL", url)
    assert cli.main(["migrate", *args]) == 0
    return ""


def test_check_reports_and_changes_nothing(
    seed_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = dump(seed_url, "outbound_call_runs", "outbound_call_jobs")
    run_cli(monkeypatch, seed_url, "--check")
    report = json.loads(capsys.readouterr().out)
    assert report["revision"] is None
    pending = report["pending_revisions"]
    assert pending[0] == "0001" and pending[-1] == migrate.head()
    plan = report["seed_adoption"]
    assert plan["seed_tables_found"] is True
    assert plan["runs"]["to_copy"] == len(SEED_RUNS)
    assert plan["jobs"]["to_copy"] == len(SEED_JOBS)
    assert plan["runs"]["heartbeats_backfilled"] == 3
    assert plan["runs"]["superseded"] == 1
    assert plan["unknown_statuses"] == {"run:paused": 1, "job:no_answer": 1}
    assert migrate.current(seed_url) is None
    engine = sa.create_engine(seed_url, poolclass=pool.NullPool)
    assert "runs" not in sa.inspect(engine).get_table_names()
    engine.dispose()
    assert dump(seed_url, "outbound_call_runs", "outbound_call_jobs") == before


def test_adoption_keeps_every_row_backfills_and_is_idempotent(
    seed_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_before = dump(seed_url, "outbound_call_runs", "outbound_call_jobs")
    run_cli(monkeypatch, seed_url, "--adopt-seed")
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("{") :])["seed_adoption"]
    assert plan["runs"]["to_copy"] == len(SEED_RUNS)
    assert migrate.current(seed_url) == migrate.head()
    migrate.check(seed_url)  # runsvc's schema, exactly

    # Every row is there, and the monolith's tables are untouched.
    adopted = dump(seed_url, "runs", "jobs")
    assert len(adopted["runs"]) == len(SEED_RUNS) and len(adopted["jobs"]) == len(SEED_JOBS)
    assert dump(seed_url, "outbound_call_runs", "outbound_call_jobs") == seed_before

    runs = runs_by_seed_id(seed_url)
    # Migration 114's backfill: COALESCE(lock_ts, updated_at, created_at) for live runs.
    assert runs[1]["last_heartbeat_at"] == utc(ago(10))
    assert runs[3]["last_heartbeat_at"] == utc(ago(5))
    assert runs[5]["last_heartbeat_at"] == utc(ago(1))
    assert runs[2]["last_heartbeat_at"] is None
    states = {seed_id: (r["state"], r["stop_reason"]) for seed_id, r in runs.items()}
    assert states == {
        1: ("RUNNING", None),
        2: ("COMPLETED", None),
        3: ("PENDING", None),
        4: ("STOPPED", adopt.SUPERSEDED),
        5: ("RUNNING", None),
        6: ("STOPPED", adopt.SEED_STOPPED),
        7: ("CANCELLED", "CANCELLED_BY_USER"),
        8: ("STOPPED", adopt.UNKNOWN_STATUS),
        9: ("FAILED", "WORKER_FAILED"),
    }
    assert runs[1]["worker_id"] == "w-old" and runs[1]["lease_epoch"] == 1
    assert runs[1]["tenant_id"] == "1" and runs[1]["request_id"] == "seed-run-1"
    assert "paused" in runs[8]["error"]

    jobs = jobs_by_seed_id(seed_url)
    assert {j: jobs[j]["state"] for j in (1, 2, 3, 7, 10)} == {
        1: "COMPLETED",
        2: "IN_PROGRESS",
        3: "QUEUED",
        7: "QUEUED",
        10: "IN_PROGRESS",
    }
    # Unfinished jobs of runs that ended fail as runsvc fails them.
    assert (jobs[8]["state"], jobs[8]["stop_reason"]) == ("FAILED", adopt.SUPERSEDED)
    assert (jobs[9]["state"], jobs[9]["stop_reason"]) == ("FAILED", "WORKER_LOST")
    assert (jobs[12]["state"], jobs[12]["stop_reason"]) == ("FAILED", adopt.SEED_STOPPED)
    assert (jobs[11]["state"], jobs[11]["stop_reason"]) == ("FAILED", adopt.UNKNOWN_STATUS)
    assert json.loads(jobs[3]["payload"]) == {
        "seed_job_id": 3,
        "lead_id": 103,
        "phone_number": "+972500000003",
    }
    assert [jobs[j]["seq"] for j in (1, 2, 3, 4)] == [1, 2, 3, 4]

    # A second run changes nothing.
    run_cli(monkeypatch, seed_url, "--adopt-seed")
    again = json.loads(capsys.readouterr().out.split("\n", 1)[1])["seed_adoption"]
    assert again["runs"]["to_copy"] == 0 and again["jobs"]["to_copy"] == 0
    assert again["runs"]["already_adopted"] == len(SEED_RUNS)
    assert dump(seed_url, "runs", "jobs") == adopted


def test_adopted_runs_are_judged_by_runsvc_rules(
    seed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_cli(monkeypatch, seed_url, "--adopt-seed")
    db = Database(make_engine(seed_url))
    try:
        # A replica that has had database access for 31 s already.
        clock = FakeClock(utc(NOW) - timedelta(seconds=31))
        service = RunService(
            db=db, clock=clock, slots=StoreSlots(SlotLimits(default=3)), policy=LivenessPolicy()
        )
        service.context.transact(lambda conn, now, notes: None, caller=REAPER)
        clock.advance(31)
        report = Reaper(service.context).pass_once()
        # Runs 1 and 5 have been silent for longer than 30 s: both stop.
        assert report.ended == {"HEARTBEAT_TIMEOUT": 2}
    finally:
        db.dispose()
    runs = runs_by_seed_id(seed_url)
    assert runs[1]["state"] == "STOPPED" and runs[5]["state"] == "STOPPED"
    assert runs[3]["state"] == "PENDING"
    # Adoption after that leaves what runsvc decided alone.
    after = dump(seed_url, "runs", "jobs")
    run_cli(monkeypatch, seed_url, "--adopt-seed")
    assert dump(seed_url, "runs", "jobs") == after


def test_adopted_runs_keep_the_monoliths_ids_as_numbers_and_new_runs_follow(
    seed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_cli(monkeypatch, seed_url, "--adopt-seed")
    runs = runs_by_seed_id(seed_url)
    assert {seed_id: r["number"] for seed_id, r in runs.items()} == {
        seed_id: seed_id for seed_id, *_ in SEED_RUNS
    }
    db = Database(make_engine(seed_url))
    try:
        service = RunService(
            db=db,
            clock=FakeClock(utc(NOW)),
            slots=StoreSlots(SlotLimits(default=3)),
            policy=LivenessPolicy(),
        )
        created = [
            service.backend.create_run(
                tenant_id=f"new-{i}",
                request_id="r",
                jobs=[JobSpec("a", b"")],
                caller=REAPER,
            )
            for i in range(2)
        ]
        # By number, the adopted run is found as the monolith named it.
        found = service.backend.get_run(tenant_id="1", run_id="2", caller=REAPER)
    finally:
        db.dispose()
    largest = max(seed_id for seed_id, *_ in SEED_RUNS)
    assert [run.number for run in created] == [largest + 1, largest + 2]
    assert found.id == adopt.run_uuid(2) and found.number == 2
