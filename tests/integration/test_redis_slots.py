"""The Redis slot backend against a real Redis, on both store engines."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import cast

import pytest
import redis

from runsvc.clock import FakeClock
from runsvc.domain import HeldSlot, RunOutcome, grant_token
from runsvc.errors import RunsvcError
from runsvc.reaper import Reaper
from runsvc.slots import SlotLimits
from tests.conftest import BACKEND, WORKER
from tests.integration.redis_helpers import (
    Replica,
    acquire,
    backdate,
    grant_times,
    in_progress,
    live,
    outbox_rows,
    replica,
    report_completed,
    reserve_for_a_dead_try,
    start_run,
)

pytestmark = pytest.mark.redis

LIMIT = 4


def scores(client: redis.Redis, key: str) -> dict[str, float]:
    """The members of a sorted set and their scores."""
    return dict(cast(list[tuple[str, float]], client.zrange(key, 0, -1, withscores=True)))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def one(db_url: str, clock: FakeClock, redis_url: str, redis_prefix: str) -> Iterator[Replica]:
    r = replica(
        db_url,
        clock,
        redis_url=redis_url,
        prefix=redis_prefix,
        limits=SlotLimits(default=LIMIT, per_tenant={"small": 2}),
        orphan_grace_seconds=0.2,
    )
    r.sync.reconciler.pass_once()  # marks the empty set ready, as a server start does
    yield r
    r.close()


@pytest.fixture
def patient(db_url: str, clock: FakeClock, redis_url: str, redis_prefix: str) -> Iterator[Replica]:
    """A replica with the production grace (10 s): whatever a test grants is within it,
    until the test moves Redis's times back (``backdate``)."""
    r = replica(db_url, clock, redis_url=redis_url, prefix=redis_prefix, limits=SlotLimits(5))
    r.sync.reconciler.pass_once()
    yield r
    r.close()


def test_limit_holds_under_two_replicas_and_many_threads(
    db_url: str, clock: FakeClock, redis_url: str, redis_prefix: str, client: redis.Redis
) -> None:
    threads_count, rounds = 8, 12
    replicas = [
        replica(db_url, clock, redis_url=redis_url, prefix=redis_prefix, limits=SlotLimits(LIMIT))
        for _ in range(2)
    ]
    first = replicas[0].service
    replicas[0].sync.reconciler.pass_once()
    claim = start_run(first, "t1", threads_count * rounds * 2)
    redis_peak: list[int] = []
    pg_peak: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_count + 1)
    done = threading.Event()

    def sampler() -> None:
        barrier.wait(timeout=10)
        while not done.is_set():
            redis_peak.append(len(live(client, redis_prefix, "t1")))
            pg_peak.append(in_progress(first, "t1"))

    def worker(index: int) -> None:
        service = replicas[index % 2].service
        try:
            barrier.wait(timeout=10)
            for _ in range(rounds):
                got = acquire(service, "t1", claim, 3)
                redis_peak.append(len(live(client, redis_prefix, "t1")))
                pg_peak.append(in_progress(first, "t1"))
                if got.jobs:
                    report_completed(service, "t1", claim, got.jobs)
        except (RunsvcError, threading.BrokenBarrierError) as error:
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    watcher = threading.Thread(target=sampler)
    for t in [*workers, watcher]:
        t.start()
    for t in workers:
        t.join(timeout=120)
    done.set()
    watcher.join(timeout=10)
    assert not any(t.is_alive() for t in [*workers, watcher])
    assert errors == []
    assert max(redis_peak) <= LIMIT
    assert max(pg_peak) <= LIMIT
    assert max(pg_peak) > 1  # the threads really overlapped
    # Everything reported: every slot is back, nothing waits in the outbox.
    assert in_progress(first, "t1") == 0
    assert live(client, redis_prefix, "t1") == set()
    assert outbox_rows(first) == 0
    for r in replicas:
        r.close()


@pytest.mark.parametrize("ending", ["finish", "cancel", "force_cancel", "stale"])
def test_each_ending_frees_exactly_that_runs_slots(
    one: Replica, client: redis.Redis, redis_prefix: str, clock: FakeClock, ending: str
) -> None:
    service = one.service
    target = start_run(service, "t1", 5, worker="w1")
    assert len(acquire(service, "t1", target, 3).jobs) == 3
    # A bystander of another tenant, and its slots.
    other = start_run(service, "t2", 5, worker="w2")
    assert len(acquire(service, "t2", other, 2).jobs) == 2
    bystander = live(client, redis_prefix, "t2")
    assert len(bystander) == 2
    assert len(live(client, redis_prefix, "t1")) == 3

    if ending == "finish":
        service.worker.finish_run(
            tenant_id="t1",
            run_id=target.run.id,
            lease_epoch=target.lease_epoch,
            outcome=RunOutcome.FAILED,
            error="boom",
            caller=WORKER,
        )
    elif ending == "cancel":
        service.backend.cancel(tenant_id="t1", run_id=target.run.id, reason="", caller=BACKEND)
        service.worker.finish_run(
            tenant_id="t1",
            run_id=target.run.id,
            lease_epoch=target.lease_epoch,
            outcome=RunOutcome.CANCELLED,
            error=None,
            caller=WORKER,
        )
    elif ending == "force_cancel":
        done = service.backend.force_cancel(
            tenant_id="t1", run_id=target.run.id, reason="", caller=BACKEND
        )
        assert (done.released_slots, done.pending_slot_releases) == (3, 0)
    else:
        clock.advance(31)
        service.worker.heartbeat(
            tenant_id="t2", run_id=other.run.id, lease_epoch=other.lease_epoch, caller=WORKER
        )
        report = Reaper(service.context).pass_once()
        assert report.total == 1

    assert live(client, redis_prefix, "t1") == set()
    assert live(client, redis_prefix, "t2") == bystander
    assert outbox_rows(service) == 0
    assert in_progress(service, "t1") == 0


def test_unused_reservations_go_back_and_reports_free_slots(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    service = one.service
    claim = start_run(service, "t1", 2)
    got = acquire(service, "t1", claim, 4)  # only 2 queued: nothing more is reserved
    assert len(got.jobs) == 2
    assert got.free_slots == LIMIT - 2
    assert len(live(client, redis_prefix, "t1")) == 2
    report_completed(service, "t1", claim, [got.jobs[0]])
    remaining = live(client, redis_prefix, "t1")
    assert len(remaining) == 1
    assert HeldSlot.parse(remaining.pop()).job_id == got.jobs[1].id
    assert outbox_rows(service) == 0


def test_resume_frees_the_crashed_leases_slots(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    service = one.service
    claim = start_run(service, "t1", 5)
    acquire(service, "t1", claim, 3)
    resumed = service.worker.claim_run(tenant_id="t1", worker_id="w", caller=WORKER)
    assert resumed is not None and resumed.resumed
    assert live(client, redis_prefix, "t1") == set()
    got = acquire(service, "t1", resumed, 4)
    assert len(got.jobs) == 2  # 3 failed as WORKER_LOST, 2 left
    assert {HeldSlot.parse(m).lease_epoch for m in live(client, redis_prefix, "t1")} == {
        resumed.lease_epoch
    }


def test_a_repeated_acquire_hands_out_what_the_first_took(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    service = one.service
    claim = start_run(service, "t1", LIMIT + 2)
    first = acquire(service, "t1", claim, LIMIT, request_id="r1")
    assert len(first.jobs) == LIMIT
    # Its answer was lost: its jobs hold every slot of the tenant. The repeat hands
    # them out again; a call that took others would find no slot free, for good.
    again = acquire(service, "t1", claim, LIMIT, request_id="r1")
    assert ([j.id for j in again.jobs], again.free_slots) == ([j.id for j in first.jobs], 0)
    assert acquire(service, "t1", claim, LIMIT, request_id="r2").jobs == []
    assert (in_progress(service, "t1"), len(live(client, redis_prefix, "t1"))) == (LIMIT, LIMIT)
    # A result reported meanwhile: the repeat hands out the rest, and takes nothing new.
    report_completed(service, "t1", claim, [first.jobs[0]])
    again = acquire(service, "t1", claim, LIMIT, request_id="r1")
    assert ([j.id for j in again.jobs], again.free_slots) == ([j.id for j in first.jobs[1:]], 1)
    assert len(acquire(service, "t1", claim, LIMIT, request_id="r3").jobs) == 1
    assert (in_progress(service, "t1"), len(live(client, redis_prefix, "t1"))) == (LIMIT, LIMIT)


def test_a_repeat_holds_again_the_slots_of_a_try_that_died_before_its_commit(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    service = one.service
    claim = start_run(service, "t1", LIMIT + 2)
    # A try of call r1 reserved slots for the first jobs, then its replica died before the
    # transaction that takes them: the slots hold the tenant's whole limit, under r1's names.
    first_ids, dead = reserve_for_a_dead_try(
        one, "t1", claim, token=grant_token("r1"), job_count=LIMIT
    )
    assert (len(dead.granted), dead.again) == (LIMIT, [])
    reserved = live(client, redis_prefix, "t1")
    # Another call finds no slot free; the repeat of r1 takes those jobs under those slots.
    assert acquire(service, "t1", claim, LIMIT, request_id="r2").jobs == []
    again = acquire(service, "t1", claim, LIMIT, request_id="r1")
    assert [j.id for j in again.jobs] == first_ids
    assert live(client, redis_prefix, "t1") == reserved
    assert in_progress(service, "t1") == LIMIT
    assert one.sync.reconciler.pass_once().orphans_removed == 0


def test_limit_per_tenant_override(one: Replica, client: redis.Redis, redis_prefix: str) -> None:
    claim = start_run(one.service, "small", 5)
    got = acquire(one.service, "small", claim, 5)
    assert (len(got.jobs), got.free_slots) == (2, 0)
    assert len(acquire(one.service, "small", claim, 5).jobs) == 0


def test_reconciler_removes_orphans_and_restores_missing_slots(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    service = one.service
    claim = start_run(service, "t1", 5)
    got = acquire(service, "t1", claim, 2)
    key = f"{redis_prefix}slots:t1"
    members = live(client, redis_prefix, "t1")
    lost = sorted(members)[0]
    client.zrem(key, lost)  # a slot Redis lost
    # A slot no job holds: an AcquireJobs that died before its transaction.
    orphan = HeldSlot(claim.run.id, claim.lease_epoch, "no-such-job", "dead").member
    assert one.sync.store.acquire("t1", limit=LIMIT, members=[orphan])[1] == [orphan]
    report = one.sync.reconciler.pass_once()
    # Fresh orphans are kept for the grace period (their transaction may be running).
    assert report.missing_restored == 1
    assert orphan in live(client, redis_prefix, "t1")
    # ... then granted a minute ago, yet not expired: removed.
    backdate(one.sync.store, "t1", 60)
    report = one.sync.reconciler.pass_once()
    assert live(client, redis_prefix, "t1") == members
    assert (report.orphans_removed, report.missing_restored) == (1, 0)
    counts = one.sync.metrics.counts()
    assert (counts.missing_restored, counts.orphans_removed) == (1, 1)
    assert len(got.jobs) == 2


def test_orphans_of_a_heartbeating_run_are_removed_once_granted_longer_ago_than_the_grace(
    patient: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    one = patient
    service, slots = one.service, one.sync.slots
    claim = start_run(service, "t1", 9)

    def reserve(token: str, job_count: int) -> list[HeldSlot]:
        return reserve_for_a_dead_try(one, "t1", claim, token=token, job_count=job_count)[1].granted

    assert len(acquire(service, "t1", claim, 2).jobs) == 2
    held = live(client, redis_prefix, "t1")
    # A replica reserved slots for the next two jobs, then died before its transaction.
    orphans = {slot.member for slot in reserve("dead", 2)}
    assert len(orphans) == 2
    assert one.sync.reconciler.pass_once().orphans_removed == 0  # granted within the grace
    # A minute passes with the run heartbeating all along: every slot of its lease,
    # the orphans included, is refreshed.
    backdate(one.sync.store, "t1", 60)
    service.worker.heartbeat(
        tenant_id="t1", run_id=claim.run.id, lease_epoch=claim.lease_epoch, caller=WORKER
    )
    assert one.sync.relay.refresh_once() == 4
    # Another AcquireJobs of the run reserved a slot just now; its transaction runs still.
    running = reserve("running", 1)
    assert len(running) == 1
    assert acquire(service, "t1", claim, 5).jobs == []  # the tenant's limit is used up

    report = one.sync.reconciler.pass_once()
    assert report.orphans_removed == 2
    in_flight = {slot.member for slot in running}
    assert live(client, redis_prefix, "t1") == held | in_flight
    assert grant_times(one.sync.store, "t1").keys() == held | in_flight
    # The transaction failed after all: its slot goes back, and the run takes jobs again.
    slots.give_back(tenant_id="t1", slots=running)
    assert len(acquire(service, "t1", claim, 5).jobs) == 3
    assert in_progress(service, "t1") == 5


def test_a_slot_without_a_grant_time_is_aged_from_its_refresh_then_no_more(
    patient: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    """A slot written before grant times were kept: a pass that finds it without a job
    keeps its last refresh as its grant time, so heartbeats cannot keep it young."""
    one = patient
    store = one.sync.store
    claim = start_run(one.service, "t1", 3)
    orphan = HeldSlot(claim.run.id, claim.lease_epoch, "j-gone", "old").member
    seconds, micros = client.time()
    refreshed = seconds * 1000 + micros // 1000
    client.zadd(store.keys.slots("t1"), {orphan: refreshed + store.ttl_ms})
    assert one.sync.reconciler.pass_once().orphans_removed == 0  # refreshed within the grace
    assert grant_times(store, "t1") == {orphan: refreshed}
    backdate(store, "t1", 60)
    one.service.worker.heartbeat(
        tenant_id="t1", run_id=claim.run.id, lease_epoch=claim.lease_epoch, caller=WORKER
    )
    assert one.sync.relay.refresh_once() == 1
    assert one.sync.reconciler.pass_once().orphans_removed == 1
    assert (live(client, redis_prefix, "t1"), grant_times(store, "t1")) == (set(), {})


def test_grant_times_follow_their_slots(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    store = one.sync.store
    claim = start_run(one.service, "t1", 6)
    first = acquire(one.service, "t1", claim, 2).jobs
    assert grant_times(store, "t1").keys() == live(client, redis_prefix, "t1")
    # The hash outlives no slot: it expires with the last refresh's lifetime.
    assert 0 < cast(int, client.pttl(store.keys.granted("t1"))) <= store.ttl_ms
    # Expired slots are dropped with their grant times when a grant makes room.
    backdate(store, "t1", store.ttl_ms / 1000 + 1)
    second = acquire(one.service, "t1", claim, 2).jobs
    assert len(second) == 2
    assert len(grant_times(store, "t1")) == 2
    assert grant_times(store, "t1").keys() == live(client, redis_prefix, "t1")
    # A grant time whose slot is gone (the set lost without its hash) goes with the next look.
    client.hset(store.keys.granted("t1"), "lost|1|j|t", 1)
    one.sync.reconciler.pass_once()
    assert grant_times(store, "t1").keys() == live(client, redis_prefix, "t1")
    # Released slots take their grant times with them.
    report_completed(one.service, "t1", claim, [*first, *second])
    assert (live(client, redis_prefix, "t1"), grant_times(store, "t1")) == (set(), {})
    assert not client.exists(store.keys.granted("t1"))


def test_redis_emptied_grants_nothing_until_rebuilt(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    service = one.service
    a = start_run(service, "t1", 9, worker="wa")
    b = start_run(service, "t2", 9, worker="wb")
    acquire(service, "t1", a, 3)
    acquire(service, "t2", b, 1)
    before = {t: live(client, redis_prefix, t) for t in ("t1", "t2")}
    client.delete(*client.keys(f"{redis_prefix}*"))  # as a restart without persistence does
    # No tenant may exceed its limit meanwhile: nothing is granted until the rebuild.
    got = acquire(service, "t1", a, 4)
    assert (got.jobs, got.free_slots) == ([], 0)
    assert in_progress(service, "t1") == 3
    report = one.sync.reconciler.pass_once()
    assert report.rebuilt
    assert {t: live(client, redis_prefix, t) for t in ("t1", "t2")} == before
    got = acquire(service, "t1", a, 4)
    assert len(got.jobs) == 1  # the limit, counted with the rebuilt slots
    assert in_progress(service, "t1") == LIMIT
    figures = one.sync.figures()
    by_tenant = {t.tenant_id: t for t in figures.tenants}
    assert (by_tenant["t1"].in_use, by_tenant["t1"].in_progress, by_tenant["t1"].limit) == (
        LIMIT,
        LIMIT,
        LIMIT,
    )
    assert figures.release_backlog == 0
    assert figures.redis_ok


def test_heartbeats_keep_the_lease_holders_slots_alive(
    one: Replica, client: redis.Redis, redis_prefix: str
) -> None:
    service = one.service
    claim = start_run(service, "t1", 3)
    acquire(service, "t1", claim, 2)
    key = f"{redis_prefix}slots:t1"
    before = scores(client, key)
    client.zadd(key, {m: s - 60_000 for m, s in before.items()}, xx=True)  # a minute older
    service.worker.heartbeat(
        tenant_id="t1", run_id=claim.run.id, lease_epoch=claim.lease_epoch, caller=WORKER
    )
    assert one.sync.relay.refresh_once() == 2
    after = scores(client, key)
    assert after.keys() == before.keys()
    assert all(after[m] >= before[m] for m in before)


def test_figures_show_the_outbox_backlog_and_its_age(
    one: Replica, clock: FakeClock, client: redis.Redis, redis_prefix: str
) -> None:
    from runsvc.store import slot_releases as outbox

    one.service.context.db.run(
        lambda conn: outbox.add(
            conn, tenant_id="t1", run_id=None, cause="test", members=["x|1|y|z"], now=clock.now()
        )
    )
    clock.advance(5)
    figures = one.sync.figures()
    assert (figures.release_backlog, figures.release_oldest_age_seconds) == (1, 5.0)
    assert one.sync.relay.drain_once() == 1
    assert one.sync.figures().release_backlog == 0
    assert one.sync.metrics.counts().releases_applied == 1
