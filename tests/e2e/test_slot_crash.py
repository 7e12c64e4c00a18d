"""A server killed right after committing a finalization, before touching Redis.

The first server process is ``runsvc serve`` with a relay that leaves every
committed slot release in the outbox (tests/support/serve_holding_releases.py),
so the kill lands exactly between the PostgreSQL commit and the Redis call. A
second process on the same database and Redis must apply that release once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, func, select

from runsvc.domain import HeldSlot
from runsvc.store.schema import slot_releases
from tests.e2e.slot_client import tenant
from tests.e2e.test_cli import (
    ServerProcess,
    clean_environ,
    free_port,
    json_lines,
    kill,
    spawn_server,
)
from tests.redis_process import RedisProcess

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

SECRET = "slot-crash-secret-that-is-long-enough-for-hs256"
RELEASE_BOUND = 10.0


def start(
    data_dir: Path, pg_url: str, redis_url: str, name: str, command: list[str] | None = None
) -> ServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = data_dir / f"{name}.stderr"
    address = f"127.0.0.1:{free_port()}"
    env = {
        **clean_environ(),
        "RUNSVC_DATA_DIR": str(data_dir),
        "RUNSVC_GRPC_ADDRESS": address,
        "RUNSVC_DATABASE_URL": pg_url,
        "RUNSVC_REDIS_URL": redis_url,
        "RUNSVC_JWT_SECRET": SECRET,
        "RUNSVC_TENANT_SLOTS": "3",
        "RUNSVC_SLOT_RELAY_INTERVAL_SECONDS": "0.2",
        # Long enough that only the relay, never the reconciler, can remove the slots.
        "RUNSVC_SLOT_ORPHAN_GRACE_SECONDS": "300",
    }
    return spawn_server(env, data_dir, address, stderr_path, command=command)


def outbox(pg_url: str) -> int:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(slot_releases)).scalar_one())
    finally:
        engine.dispose()


def test_release_committed_before_a_crash_is_applied_once_after_restart(
    postgres_url: str, redis_server: RedisProcess, tmp_path: Path
) -> None:
    client = redis_server.client()
    first = start(
        tmp_path / "data",
        postgres_url,
        redis_server.url,
        "first",
        command=[sys.executable, "-m", "tests.support.serve_holding_releases"],
    )
    second = None
    try:
        with grpc.insecure_channel(first.address) as chan:
            t1, t2 = tenant(chan, SECRET, "t1"), tenant(chan, SECRET, "t2")
            run_a, epoch_a = t1.start_run("a", 4)
            assert len(t1.acquire(run_a, epoch_a, 2)) == 2
            run_b, epoch_b = t2.start_run("b", 4)
            assert len(t2.acquire(run_b, epoch_b, 1)) == 1
            held_a = {str(m) for m in client.zrange("runsvc:slots:t1", 0, -1)}
            held_b = {str(m) for m in client.zrange("runsvc:slots:t2", 0, -1)}
            assert len(held_a) == 2 and len(held_b) == 1
            done = t1.force_cancel(run_a, timeout=5)
            assert (done.released_slots, done.pending_slot_releases) == (2, 2)
        # Committed in PostgreSQL, Redis untouched: now the process dies.
        first.process.kill()
        first.process.wait(timeout=10)
        assert outbox(postgres_url) == 1
        assert {str(m) for m in client.zrange("runsvc:slots:t1", 0, -1)} == held_a

        second = start(tmp_path / "data", postgres_url, redis_server.url, "second")
        deadline_ok = False
        for _ in range(int(RELEASE_BOUND / 0.1)):
            if outbox(postgres_url) == 0:
                deadline_ok = True
                break
            time.sleep(0.1)
        assert deadline_ok, second.stderr()
        assert client.zrange("runsvc:slots:t1", 0, -1) == []
        assert {str(m) for m in client.zrange("runsvc:slots:t2", 0, -1)} == held_b
        assert {HeldSlot.parse(m).run_id for m in held_a} == {run_a}
        applied = [
            r for r in json_lines(second.stderr()) if r.get("message") == "slot release applied"
        ]
        assert len(applied) == 1, applied
        assert (applied[0]["run_id"], applied[0]["slots"], applied[0]["removed"]) == (run_a, 2, 2)
        assert not [
            r for r in json_lines(first.stderr()) if r.get("message") == "slot release applied"
        ]
    finally:
        kill(first.process)
        if second is not None:
            kill(second.process)
        client.close()
