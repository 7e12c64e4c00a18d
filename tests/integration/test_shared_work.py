"""Replicas share the background work instead of each repeating it.

Several replicas (engines of their own on one database, one shared clock)
run the reaper, the slot-release relay and the slot reconciler at once. Each
stale run is claimed and ended by one replica, each pending release applied
by one relay, and the reconciler passes once per interval across the fleet.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
import redis
from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, func, insert, select

from runsvc.clock import FakeClock
from runsvc.domain import JobState, LivenessPolicy, RunState
from runsvc.metrics.counters import MetricsObserver
from runsvc.periodic import IntervalLease
from runsvc.reaper import REAPER, Reaper, ReapReport
from runsvc.redisslots.backend import Health, RedisSlotStore, connect
from runsvc.redisslots.metrics import SlotMetrics
from runsvc.redisslots.reconciler import Reconciler
from runsvc.redisslots.relay import ReleaseRelay
from runsvc.service import RunService
from runsvc.slots import SlotLimits, StoreSlots
from runsvc.store import check, leases
from runsvc.store import runs as run_store
from runsvc.store import slot_releases as outbox
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import audit_events, jobs, runs
from tests.redis_process import free_port

STALE_RUNS = 1000
REAPERS = 4
RELEASES = 300
JOIN_TIMEOUT = 120.0


def run_threads(targets: Sequence[Callable[[], None]]) -> None:
    """Start every target at one barrier; fail with the first error any of them raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets), timeout=JOIN_TIMEOUT)

    def body(target: Callable[[], None]) -> None:
        try:
            barrier.wait()
            target()
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=body, args=(t,), name=f"replica-{i}", daemon=True)
        for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a replica did not finish"
    if errors:
        raise errors[0]


@pytest.fixture
def databases(db_url: str) -> Iterator[list[Database]]:
    """One engine per replica on the same store."""
    dbs = [Database(make_engine(db_url, max_connections=8)) for _ in range(REAPERS)]
    yield dbs
    for db in dbs:
        db.dispose()


def passes(registry: CollectorRegistry, job: str) -> dict[str, float | None]:
    """This replica's ``runsvc_background_passes_total`` for ``job``, as scraped."""
    return {
        result: registry.get_sample_value(
            "runsvc_background_passes_total", {"job": job, "result": result}
        )
        for result in ("done", "skipped")
    }


# --- the reaper ------------------------------------------------------------------------


def insert_stale_runs(db: Database, clock: FakeClock, count: int) -> None:
    """``count`` running runs, each holding one job in progress, whose worker last
    heartbeated now; written in two statements, so that set-up takes no time to speak of."""
    now = clock.now()
    run_rows = [
        {
            "id": str(uuid.uuid4()),
            "tenant_id": f"t{i}",
            "request_id": "r",
            "state": RunState.RUNNING.value,
            "cancel_requested": False,
            "worker_id": f"w{i}",
            "lease_epoch": 1,
            "lock_ts": now,
            "last_heartbeat_at": now,
            "created_at": now,
            "started_at": now,
            "updated_at": now,
        }
        for i in range(count)
    ]
    job_rows = [
        {
            "id": str(uuid.uuid4()),
            "run_id": row["id"],
            "tenant_id": row["tenant_id"],
            "seq": 0,
            "external_id": "call",
            "payload": b"x",
            "state": JobState.IN_PROGRESS.value,
            "lease_epoch": 1,
            "slot_token": uuid.uuid4().hex,
            "created_at": now,
            "started_at": now,
        }
        for row in run_rows
    ]

    def write(conn: Connection) -> None:
        conn.execute(insert(runs), run_rows)
        conn.execute(insert(jobs), job_rows)

    db.run(write)


def trusting_replicas(
    databases: list[Database], clock: FakeClock, policy: LivenessPolicy
) -> list[RunService]:
    """Services that have had database access since now (their silence horizon opens later)."""
    services = [
        RunService(db=db, clock=clock, slots=StoreSlots(SlotLimits(default=3)), policy=policy)
        for db in databases
    ]
    for svc in services:
        svc.context.transact(lambda conn, now, notes: None, caller=REAPER)
    return services


def ended_audit_rows(db: Database) -> int:
    return db.run(
        lambda conn: conn.execute(
            select(func.count()).where(audit_events.c.action == "RUN_ENDED")
        ).scalar_one()
    )


@pytest.mark.postgres
def test_replicas_reaping_at_once_take_disjoint_batches(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    dbs = [Database(make_engine(postgres_url, max_connections=8)) for _ in range(REAPERS)]
    # Every run goes silent at once: only the share of the work is under test here.
    services = trusting_replicas(dbs, clock, LivenessPolicy(breaker_share=1.0))
    try:
        insert_stale_runs(dbs[0], clock, STALE_RUNS)
        clock.advance(31)

        # Every candidate row the replicas' reads return, whichever replica read it.
        read: Counter[str] = Counter()
        lock = threading.Lock()
        find_ending = run_store.find_ending

        def counting(
            conn: Connection, guard: run_store.Guard, *, limit: int
        ) -> list[run_store.SilentRun]:
            found = find_ending(conn, guard, limit=limit)
            with lock:
                read[threading.current_thread().name] += len(found)
            return found

        monkeypatch.setattr(run_store, "find_ending", counting)
        reports: dict[str, ReapReport] = {}

        def reaper(svc: RunService) -> Callable[[], None]:
            def reap() -> None:
                reports[threading.current_thread().name] = Reaper(
                    svc.context, batch_size=100
                ).pass_once()

            return reap

        run_threads([reaper(svc) for svc in services])

        assert len(reports) == REAPERS
        assert sum(r.total for r in reports.values()) == STALE_RUNS
        # The sharing: every stale run was read as a candidate once in all, not once
        # per replica, and each replica ended every run it took.
        assert sum(read.values()) == STALE_RUNS
        assert sum(r.claimed for r in reports.values()) == STALE_RUNS
        assert all(r.claimed == r.total for r in reports.values())
        assert ended_audit_rows(dbs[0]) == STALE_RUNS
        assert dbs[0].run(check.violations) == []
    finally:
        for svc in services:
            svc.close()
        for db in dbs:
            db.dispose()


@pytest.mark.postgres
def test_a_pass_skips_runs_another_replica_has_claimed(postgres_url: str) -> None:
    clock = FakeClock()
    dbs = [Database(make_engine(postgres_url, max_connections=4)) for _ in range(2)]
    services = trusting_replicas(dbs, clock, LivenessPolicy(breaker_share=1.0))
    registry = CollectorRegistry()
    services[1].context.observer = MetricsObserver(registry, reap_interval_seconds=5)
    try:
        insert_stale_runs(dbs[0], clock, 5)
        clock.advance(31)
        since = clock.now() - timedelta(seconds=30)
        # Replica 0's pass is under way: it has claimed every stale run.
        with dbs[0].engine.connect() as held:
            # The store's engine is in autocommit (Database spells out its transactions).
            held.exec_driver_sql("BEGIN")
            silent = run_store.Guard(silent_since=since)
            assert len(run_store.find_ending(held, silent, limit=10)) == 5
            # Replica 1 does not wait for it, and takes none of its runs.
            report = Reaper(services[1].context).pass_once()
            assert (report.claimed, report.total) == (0, 0)
            assert passes(registry, "reaper") == {"done": 0, "skipped": 1}
            held.exec_driver_sql("ROLLBACK")  # replica 0 died mid-pass: its claims go with it
        report = Reaper(services[1].context).pass_once()
        assert (report.claimed, report.total) == (5, 5)
        assert passes(registry, "reaper") == {"done": 1, "skipped": 1}
    finally:
        for svc in services:
            svc.close()
        for db in dbs:
            db.dispose()


def test_breaker_judges_the_fleet_whoever_reaps(db_url: str, databases: list[Database]) -> None:
    """Per replica, the breaker counts every running run: sharing leaves its verdict alone."""
    clock = FakeClock()
    services = trusting_replicas(databases[:2], clock, LivenessPolicy())
    try:
        insert_stale_runs(databases[0], clock, 8)
        clock.advance(31)
        held = [Reaper(svc.context).pass_once() for svc in services]
        assert [r.held_back for r in held] == [8, 8]
        assert sum(r.total for r in held) == 0
        for svc in services:
            svc.context.policy = replace(svc.context.policy, breaker_share=1.0)
        reports = [Reaper(svc.context, batch_size=3).pass_once() for svc in services]
        assert [r.total for r in reports] == [8, 0]  # the first took them all, batch by batch
        assert ended_audit_rows(databases[0]) == 8
    finally:
        for svc in services:
            svc.close()


# --- the relay ---------------------------------------------------------------------------


class CountingStore(RedisSlotStore):
    """The real store, noting which releases it was asked to apply."""

    def __init__(self, client: redis.Redis, prefix: str, applied: Counter[tuple[str, ...]]) -> None:
        super().__init__(client, prefix=prefix, ttl_seconds=120, health=Health())
        self.applied = applied
        self._lock = threading.Lock()

    def release(self, tenant_id: str, members: Sequence[str]) -> int:
        with self._lock:
            self.applied[(tenant_id, *members)] += 1
        return super().release(tenant_id, members)


def member(i: int) -> str:
    return f"run-{i}|1|job-{i}|token"


def add_releases(db: Database, clock: FakeClock, store: RedisSlotStore, count: int) -> None:
    """``count`` pending releases of slots that Redis really holds."""
    tenants = [f"t{i % 7}" for i in range(count)]
    for i, tenant in enumerate(tenants):
        store.restore(tenant, [member(i)])

    def write(conn: Connection) -> None:
        for i, tenant in enumerate(tenants):
            outbox.add(
                conn,
                tenant_id=tenant,
                run_id=None,
                cause="test",
                members=[member(i)],
                now=clock.now(),
            )

    db.run(write)


def outbox_size(db: Database) -> int:
    return db.run(lambda conn: outbox.backlog(conn, tenant_id=None).count)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url, timeout=2.0)
    yield client
    client.close()


@pytest.mark.redis
def test_two_relays_apply_each_release_once(
    db_url: str, databases: list[Database], redis_client: redis.Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    applied: Counter[tuple[str, ...]] = Counter()
    store = CountingStore(redis_client, redis_prefix, applied)
    add_releases(databases[0], clock, store, RELEASES)
    applied.clear()
    metrics = [SlotMetrics(), SlotMetrics()]
    relays = [
        ReleaseRelay(db, store, m, clock=clock) for db, m in zip(databases, metrics, strict=False)
    ]

    def drain(relay: ReleaseRelay) -> Callable[[], None]:
        def until_empty() -> None:
            # Rows the other relay holds are skipped, not waited for: loop until none is left.
            while outbox_size(databases[0]):
                relay.drain_once()

        return until_empty

    run_threads([drain(r) for r in relays])

    assert outbox_size(databases[0]) == 0
    assert len(applied) == RELEASES
    assert set(applied.values()) == {1}  # no release applied twice
    assert sum(m.counts().releases_applied for m in metrics) == RELEASES
    assert sum(m.counts().slots_removed for m in metrics) == RELEASES
    assert all(not store.live(f"t{t}") for t in range(7))


@pytest.mark.redis
def test_a_claim_outlives_its_relay_only_for_its_time(
    db_url: str, databases: list[Database], redis_client: redis.Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    applied: Counter[tuple[str, ...]] = Counter()
    store = CountingStore(redis_client, redis_prefix, applied)
    add_releases(databases[0], clock, store, 3)
    applied.clear()

    # A relay claims every row, then dies before applying any.
    def claim(conn: Connection) -> list[outbox.PendingRelease]:
        return outbox.claim(
            conn,
            tenant_id=None,
            holder="dead-replica",
            now=clock.now(),
            until=clock.now() + timedelta(seconds=30),
            limit=10,
        )

    assert len(databases[0].run(claim)) == 3
    survivor = ReleaseRelay(databases[1], store, SlotMetrics(), clock=clock)
    assert survivor.drain_once() == 0
    assert survivor.apply_now(1) is False  # not ours to apply now either
    clock.advance(29)
    assert survivor.drain_once() == 0
    clock.advance(2)
    assert survivor.drain_once() == 3
    assert outbox_size(databases[0]) == 0
    assert set(applied.values()) == {1}


@pytest.mark.redis
def test_a_failed_attempt_frees_its_claims_for_any_relay(
    db_url: str, databases: list[Database], redis_client: redis.Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    store = CountingStore(redis_client, redis_prefix, Counter())
    add_releases(databases[0], clock, store, 2)
    nowhere = connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    broken = RedisSlotStore(nowhere, prefix=redis_prefix, ttl_seconds=120, health=Health())
    failing = ReleaseRelay(databases[0], broken, SlotMetrics(), clock=clock)
    try:
        with pytest.raises(redis.RedisError):
            failing.drain_once()
    finally:
        nowhere.close()
    rows = databases[0].run(
        lambda conn: (
            conn.execute(select(outbox.slot_releases).order_by(outbox.slot_releases.c.id))
            .mappings()
            .all()
        )
    )
    # The batch stopped at its first failure; every row it held is free again.
    assert [(r["attempts"], r["claimed_by"]) for r in rows] == [(1, None), (1, None)]
    # Same database time: the other relay need not wait for any claim to expire.
    other = ReleaseRelay(databases[1], store, SlotMetrics(), clock=clock)
    assert other.drain_once() == 2


# --- the reconciler and its lease ---------------------------------------------------------


def test_a_lease_is_one_holders_until_it_expires(database: Database) -> None:
    start = FakeClock().now()

    def at(seconds: float) -> datetime:
        return start + timedelta(seconds=seconds)

    def take(holder: str, now: float = 0) -> bool:
        return database.run(
            lambda conn: leases.take(conn, "job", holder=holder, now=at(now), until=at(now + 30))
        )

    def give_up(holder: str, now: float) -> bool:
        return database.run(lambda conn: leases.give_up(conn, "job", holder=holder, now=at(now)))

    def holder(now: float) -> str | None:
        return database.run(lambda conn: leases.holder(conn, "job", now=at(now)))

    assert take("a")
    assert not take("b")
    assert not take("a", 10)  # not even its holder takes a second turn in one interval
    assert holder(29) == "a"
    assert not take("b", 29)
    assert take("b", 30)  # expired: anyone's
    assert holder(31) == "b"
    assert not give_up("a", 31)  # not a's to give up
    assert give_up("b", 41)
    assert holder(41) is None
    assert take("a", 41)


INTERVAL = 30.0


@pytest.fixture
def reconcilers(
    db_url: str, databases: list[Database], redis_client: redis.Redis, redis_prefix: str
) -> Iterator[tuple[list[Reconciler], FakeClock, list[CollectorRegistry]]]:
    clock = FakeClock()
    registries = [CollectorRegistry() for _ in range(2)]
    observers = [MetricsObserver(r, reap_interval_seconds=5) for r in registries]
    store = RedisSlotStore(redis_client, prefix=redis_prefix, ttl_seconds=120, health=Health())
    store.mark_ready()
    built = [
        Reconciler(
            db,
            store,
            SlotMetrics(),
            interval=INTERVAL,
            turn=IntervalLease(
                db, clock, job="slot_reconciler", interval=INTERVAL, observer=observer
            ),
        )
        for db, observer in zip(databases, observers, strict=False)
    ]
    yield built, clock, registries


def race_passes(reconcilers: list[Reconciler]) -> int:
    done: list[object] = []
    run_threads(
        [lambda r=r: done.append(r.pass_if_due()) for r in reconcilers]  # type: ignore[misc]
    )
    return sum(1 for report in done if report is not None)


@pytest.mark.redis
def test_two_reconcilers_pass_once_per_interval(
    reconcilers: tuple[list[Reconciler], FakeClock, list[CollectorRegistry]],
) -> None:
    pair, clock, registries = reconcilers
    assert race_passes(pair) == 1
    clock.advance(INTERVAL / 2)
    assert race_passes(pair) == 0
    clock.advance(INTERVAL / 2)
    assert race_passes(pair) == 1
    clock.advance(INTERVAL)
    assert race_passes(pair) == 1
    totals = [passes(r, "slot_reconciler") for r in registries]
    assert sum(t["done"] or 0 for t in totals) == 3
    assert sum(t["skipped"] or 0 for t in totals) == 5


@pytest.mark.redis
def test_when_the_lease_holder_dies_mid_pass_another_takes_the_next_turn(
    reconcilers: tuple[list[Reconciler], FakeClock, list[CollectorRegistry]],
) -> None:
    (dying, survivor), clock, _ = reconcilers
    assert dying.turn is not None and dying.turn.take()  # its pass begins, and never ends
    assert survivor.pass_if_due() is None
    clock.advance(INTERVAL - 1)
    assert survivor.pass_if_due() is None
    clock.advance(1)
    assert survivor.pass_if_due() is not None


@pytest.mark.redis
def test_a_failed_pass_gives_its_turn_up(
    reconcilers: tuple[list[Reconciler], FakeClock, list[CollectorRegistry]],
    databases: list[Database],
    redis_prefix: str,
) -> None:
    (_, healthy), clock, _ = reconcilers
    nowhere = connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    broken = Reconciler(
        databases[0],
        RedisSlotStore(nowhere, prefix=redis_prefix, ttl_seconds=120, health=Health()),
        SlotMetrics(),
        turn=IntervalLease(databases[0], clock, job="slot_reconciler", interval=INTERVAL),
    )
    try:
        assert broken.turn is not None
        with pytest.raises(redis.RedisError):
            broken.turn.run(broken.pass_once)  # took the turn, then failed
    finally:
        nowhere.close()
    assert healthy.pass_if_due() is not None  # at once: no waiting out the failed turn


@pytest.mark.redis
def test_a_rebuild_waits_for_nobodys_turn(
    reconcilers: tuple[list[Reconciler], FakeClock, list[CollectorRegistry]],
    redis_client: redis.Redis,
    redis_prefix: str,
) -> None:
    pair, _, registries = reconcilers
    assert pair[0].pass_if_due() is not None  # replica 0 holds this interval's turn
    redis_client.delete(f"{redis_prefix}ready")  # Redis lost its slots
    report = pair[1].pass_if_due()
    assert report is not None and report.rebuilt
    assert passes(registries[1], "slot_reconciler") == {"done": 1, "skipped": 0}
    assert pair[1].pass_if_due() is None  # rebuilt: back to taking turns
