"""The invariant checker: clean on what the service leaves, loud on what it never would."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update

from runsvc.clock import FakeClock
from runsvc.domain import JobSpec
from runsvc.reaper import Reaper
from runsvc.service import RunService
from runsvc.store import check
from runsvc.store.engine import make_engine
from runsvc.store.schema import audit_events, jobs, metadata, runs
from tests.conftest import BACKEND, WORKER
from tests.e2e.test_cli import clean_environ, runsvc_command


def _kinds(service: RunService) -> list[str]:
    return sorted(v.kind for v in service.context.db.run(check.violations))


def test_clean_after_runs_end_and_broken_rows_are_named(
    service: RunService, clock: FakeClock
) -> None:
    for tenant in ("a", "b"):
        service.backend.create_run(
            tenant_id=tenant, request_id="r", jobs=[JobSpec("c1", b"x")], caller=BACKEND
        )
    claim = service.worker.claim_run(tenant_id="a", worker_id="w", caller=WORKER)
    assert claim is not None
    service.worker.acquire_jobs(
        tenant_id="a",
        run_id=claim.run.id,
        lease_epoch=claim.lease_epoch,
        max_jobs=1,
        caller=WORKER,
    )
    clock.advance(31)
    assert Reaper(service.context).pass_once().total == 1
    assert _kinds(service) == []

    db = service.context.db
    # A second RUN_ENDED row for the stopped run, and an in-progress job in the pending one.
    db.run(
        lambda conn: conn.execute(
            audit_events.insert().values(
                created_at=clock.now(),
                tag="X",
                action="RUN_ENDED",
                run_id=claim.run.id,
                tenant_id="a",
                detail="{}",
            )
        )
    )
    db.run(
        lambda conn: conn.execute(
            update(jobs).where(jobs.c.tenant_id == "b").values(state="IN_PROGRESS")
        )
    )
    assert _kinds(service) == ["ENDED_RUN_AUDITS", "UNFINISHED_JOBS"]
    db.run(
        lambda conn: conn.execute(update(runs).where(runs.c.tenant_id == "b").values(state="ODD"))
    )
    assert "RUN_STATE" in _kinds(service)


def test_runsvc_check_exits_1_and_names_each_violation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runsvc.db'}"
    engine = make_engine(url)
    metadata.create_all(engine)
    env = {**clean_environ(), "RUNSVC_DATABASE_URL": url, "RUNSVC_DATA_DIR": str(tmp_path)}

    def check_cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*runsvc_command(), "check"], env=env, capture_output=True, text=True, timeout=60
        )

    clean = check_cli()
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout.splitlines()[-1]) == {"violations": 0}

    with engine.begin() as conn:  # an ended run with no audit row
        conn.execute(
            runs.insert().values(
                id="r1",
                tenant_id="t",
                request_id="q",
                state="STOPPED",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
                updated_at=datetime(2026, 1, 1, tzinfo=UTC),
            )
        )
    engine.dispose()
    broken = check_cli()
    assert broken.returncode == 1
    lines = [json.loads(line) for line in broken.stdout.splitlines()]
    assert lines[0]["kind"] == "ENDED_RUN_AUDITS" and lines[0]["run_id"] == "r1"
    assert lines[-1] == {"violations": 1}
