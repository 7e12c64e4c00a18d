"""Three replicas on one PostgreSQL and one Redis, clients balancing over them, one killed.

Workers are the example dialer (the client package's ``Lease``) and the web
backend is a ``BackendClient``, both given the three addresses: ``round_robin``
spreads their calls and the client's retries carry them over the replica that
is SIGKILLed and started again while they work.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from runsvc.store.check import RUN_ENDED
from runsvc.store.schema import audit_events, runs
from runsvc_client import BackendClient, JobSpec, RunsvcError
from tests.e2e.test_cli import ServerProcess, clean_environ, handled_calls, runsvc_command
from tests.faults.conftest import (
    REAP_INTERVAL,
    SECRET,
    Fleet,
    Store,
    Worker,
    issue,
)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

STALE = 3.0  # heartbeats every 1 s, self-fencing after 2 s
LIVE_WORKERS = 3
JOBS = 400  # more than a dialer gets through in the test (~20 calls/s)
CYCLE_SECONDS = 0.1  # the backend loop: at most 20 writes and 30 reads a second in all
# Per replica and tenant: room for the whole loop's rate on any one replica, with a margin.
RATE_LIMITS = "read=100:100,write=50:50"


@dataclass
class BackendLoop:
    """The web backend's calls in a loop; every failure is kept for the assertions.

    ``reader`` reads a workers' tenant (its active run, a page of runs, one run);
    ``writer`` creates runs of a tenant of its own and ends each at once, with
    Cancel (retried) and ForceCancel (never retried by the client) in turn. A
    ForceCancel that met a dying replica is repeated before the next run is created.

    The loop is paced by the clock, one cycle per ``CYCLE_SECONDS`` at most, so
    its rate is the same on a fast machine as on a slow one and stays under the
    replicas' per-tenant rate limits, which this test does not test: two writes
    and three reads per cycle against RATE_LIMITS below, even if every call of a
    second lands on one replica.
    """

    reader: BackendClient
    writer: BackendClient
    watched_run: str
    calls: int = 0
    cycles: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    unended: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def attempt(self, name: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        try:
            return call(*args, **kwargs)
        except RunsvcError as error:
            self.failures.append((name, type(error).__name__))
            return None

    def run(self) -> None:
        next_cycle = time.monotonic()
        while not self.stop.is_set():
            next_cycle += CYCLE_SECONDS
            self.cycle()
            # A late cycle starts the next one at once, never a burst to catch up.
            next_cycle = max(next_cycle, time.monotonic())
            self.stop.wait(next_cycle - time.monotonic())

    def cycle(self) -> None:
        self.attempt("get_active", self.reader.get_active)
        self.attempt("get_run", self.reader.get_run, self.watched_run)
        self.attempt("list_runs", lambda: next(iter(self.reader.list_runs()), None))
        self.cycles += 1
        # As the web backend does: a run whose ending failed is ended again before the
        # tenant may start another (its active run would refuse the next one).
        if self.unended is not None:
            if self.attempt("force_cancel", self.writer.force_cancel, self.unended) is None:
                return
            self.unended = None
        jobs = [JobSpec("c1")]
        created = self.attempt(
            "create_run", self.writer.create_run, jobs, request_id=f"loop-{self.cycles}"
        )
        if created is None:
            return
        if self.cycles % 2:
            ended = self.attempt("cancel", self.writer.cancel, created.id)
        else:
            ended = self.attempt("force_cancel", self.writer.force_cancel, created.id)
        if ended is None:
            self.unended = created.id


def terminal_audit_counts(store: Store) -> dict[str, int]:
    """RUN_ENDED rows per ended run (a run ended twice would show 2)."""
    with store.engine.connect() as conn:
        ended = select(runs.c.id).where(runs.c.state.not_in(["PENDING", "RUNNING"]))
        rows = conn.execute(
            select(runs.c.id, func.count(audit_events.c.id))
            .select_from(
                runs.outerjoin(
                    audit_events,
                    (audit_events.c.run_id == runs.c.id) & (audit_events.c.action == RUN_ENDED),
                )
            )
            .where(runs.c.id.in_(ended))
            .group_by(runs.c.id)
        )
        return {run_id: count for run_id, count in rows}


def done_jobs(store: Store, run_id: str) -> int:
    states = store.job_states(run_id)
    return sum(n for state, n in states.items() if state not in {"QUEUED", "IN_PROGRESS"})


def start_replicas(fleet: Fleet, env: dict[str, str]) -> list[ServerProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda _: fleet.server(**env), range(3)))


def handled_anything(server: ServerProcess) -> bool:
    """Whether the replica's metrics show any RunService call answered."""
    return handled_calls(server.metrics()) > 0


def test_three_replicas_one_killed_and_restarted_mid_load(
    fleet: Fleet, store: Store, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = {
        "RUNSVC_STALE_AFTER_SECONDS": str(STALE),
        "RUNSVC_REDIS_URL": redis_url,
        "RUNSVC_REDIS_KEY_PREFIX": redis_prefix,
        "RUNSVC_RATE_LIMITS": RATE_LIMITS,
    }
    replicas = start_replicas(fleet, env)
    addresses = ",".join(r.address for r in replicas)
    tenants = [f"t{i}" for i in range(LIVE_WORKERS + 1)]
    run_ids = {t: fleet.create_run(replicas[0].address, t, jobs=JOBS) for t in tenants}
    dialers: list[Worker] = [
        fleet.dialer(addresses, t, f"d-{t}", "--stale-after", str(STALE)) for t in tenants
    ]
    *live, doomed = dialers
    doomed_run_id = run_ids[tenants[-1]]
    wait_for(lambda: all("claimed run" in d.log.read_text() for d in dialers), timeout=20)

    reader = BackendClient(addresses.split(","), token=issue("backend", tenants[0]))
    writer = BackendClient(addresses.split(","), token=issue("backend", "backend-loop"))
    loop = BackendLoop(reader, writer, watched_run=run_ids[tenants[0]])
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        time.sleep(2.0)
        victim = replicas[1]
        assert handled_anything(victim)  # it had its share of the calls
        before_kill = {t: done_jobs(store, run_ids[t]) for t in tenants[:LIVE_WORKERS]}
        victim.process.kill()
        victim.process.wait(timeout=10)
        doomed.process.kill()  # a worker that dies meanwhile must still be caught
        doomed.process.wait(timeout=10)
        time.sleep(1.0)
        again = fleet.server(address=victim.address, **env)
        # The restarted replica takes calls again (clients redial within 5 s).
        wait_for(lambda: handled_anything(again), timeout=20, step=0.5)
        wait_for(
            lambda: store.run(doomed_run_id).state != "RUNNING",
            timeout=STALE + REAP_INTERVAL + 10,
        )
        time.sleep(1.0)
    finally:
        loop.stop.set()
        thread.join(timeout=30)
        reader.close()
        writer.close()

    # Zero false stops: every live worker's run is still running (or done), and none fenced.
    for dialer, tenant in zip(live, tenants[:LIVE_WORKERS], strict=True):
        text = dialer.log.read_text()
        assert dialer.process.poll() is None or "finished run" in text, text
        assert " lost" not in text and "claim failed" not in text, text
        assert store.run(run_ids[tenant]).state in {"RUNNING", "COMPLETED"}, tenant
        # It kept working through the kill: more jobs done since.
        assert done_jobs(store, run_ids[tenant]) > before_kill[tenant], tenant
    doomed_run = store.run(doomed_run_id)
    assert (doomed_run.state, doomed_run.stop_reason) == ("STOPPED", "HEARTBEAT_TIMEOUT")
    # Caught by the replicas' clock: silent for the threshold, then the next reaper pass.
    caught_after = (doomed_run.ended_at - doomed_run.last_heartbeat_at).total_seconds()
    assert caught_after <= STALE + REAP_INTERVAL + 2.0, caught_after
    assert store.stale_detections() == 1
    print(
        f"the killed worker's run ended {caught_after:.2f} s after its last heartbeat; backend: "
        f"{loop.calls} calls, {loop.cycles} runs created and ended, failures {loop.failures}"
    )

    # Every backend call succeeded within its retry budget; only force_cancel, which the
    # client never repeats, may have met the replica as it died.
    assert loop.cycles > 10 and loop.calls > 50
    unexpected = [f for f in loop.failures if f != ("force_cancel", "Unavailable")]
    assert unexpected == [], loop.failures

    for dialer in live:
        dialer.process.terminate()
        dialer.process.wait(timeout=15)
    for server in [*replicas, again]:
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=30)

    # Exactly one terminal audit row per ended run: nothing was finalized twice.
    counts = terminal_audit_counts(store)
    assert len(counts) >= loop.cycles // 2
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    check = subprocess_check(tmp_path, fleet.pg_url, redis_url, redis_prefix)
    assert check == {"violations": 0}


def subprocess_check(tmp_path: Path, pg_url: str, redis_url: str, prefix: str) -> Any:
    """``runsvc check`` on the database and Redis the replicas used: its last line."""
    done = subprocess.run(
        [*runsvc_command(), "check"],
        env={
            **clean_environ(),
            "RUNSVC_DATA_DIR": str(tmp_path),
            "RUNSVC_DATABASE_URL": pg_url,
            "RUNSVC_JWT_SECRET": SECRET,
            "RUNSVC_REDIS_URL": redis_url,
            "RUNSVC_REDIS_KEY_PREFIX": prefix,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
