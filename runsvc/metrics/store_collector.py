"""Gauges read from the store at scrape time: the truth, the same on every replica.

Because every replica reads the same database, these gauges agree across
replicas; the alert rules aggregate them with ``max``, never ``sum``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection

from runsvc.clock import Clock
from runsvc.domain import LivenessPolicy
from runsvc.errors import RunsvcError
from runsvc.store import stats
from runsvc.store.engine import Database

log = logging.getLogger(__name__)

# Heartbeat ages worth telling apart: a few heartbeat periods, the stale
# threshold (30 s), the seed's alert (2 min), the startup cleanup (5 min).
AGE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

SlotBacklog = Callable[[], tuple[int, float]]


def no_slot_backlog() -> tuple[int, float]:
    """The store-backed slots release in the same transaction: nothing ever waits."""
    return 0, 0.0


class StoreCollector(Collector):
    def __init__(
        self,
        db: Database,
        clock: Clock,
        policy: LivenessPolicy,
        *,
        tenant_series_limit: int = 0,
        slot_backlog: SlotBacklog = no_slot_backlog,
    ) -> None:
        self._db = db
        self._clock = clock
        self._policy = policy
        self._tenant_limit = tenant_series_limit
        self._slot_backlog = slot_backlog

    def describe(self) -> list[GaugeMetricFamily]:
        # Nothing: a registry must not query the database when this is registered.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        started = time.monotonic()
        try:
            by_state, live, per_tenant, now_ts = self._db.run(self._read)
        except Exception as error:
            # A scrape must still answer (process and gRPC metrics, and this 0).
            if isinstance(error, RunsvcError):
                log.warning("metrics could not read the store", extra={"error": str(error)})
            else:
                log.exception("metrics could not read the store")
            yield _gauge("runsvc_store_up", "1 if the last scrape could read the store.", 0)
            return
        yield _gauge("runsvc_store_up", "1 if the last scrape could read the store.", 1)
        yield from self._families(by_state, live, per_tenant, now_ts)
        yield _gauge(
            "runsvc_store_scrape_duration_seconds",
            "How long reading the store for this scrape took.",
            time.monotonic() - started,
        )

    def _read(
        self, conn: Connection
    ) -> tuple[dict[str, int], stats.LiveRuns, dict[tuple[str, str], int], float]:
        now = self._clock.now(conn)
        live = stats.live_runs(
            conn,
            now=now,
            stale_after=self._policy.stale_after,
            cancel_grace=self._policy.cancel_grace,
            bucket_bounds=AGE_BUCKETS,
        )
        per_tenant = (
            stats.active_runs_by_tenant(conn, limit=self._tenant_limit)
            if self._tenant_limit
            else {}
        )
        return stats.runs_by_state(conn), live, per_tenant, now.timestamp()

    def _families(
        self,
        by_state: dict[str, int],
        live: stats.LiveRuns,
        per_tenant: dict[tuple[str, str], int],
        now_ts: float,
    ) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        runs = GaugeMetricFamily("runsvc_runs", "Runs in the store, by state.", labels=["state"])
        for state, count in sorted(by_state.items()):
            runs.add_metric([state], count)
        yield runs
        yield _gauge(
            "runsvc_runs_stale",
            "Running runs whose last heartbeat is older than the stale threshold.",
            live.stale,
        )
        oldest = live.oldest_sign_of_life
        yield _gauge(
            "runsvc_oldest_heartbeat_age_seconds",
            "Age of the oldest last heartbeat among running runs (0 when none is running).",
            max(0.0, now_ts - oldest.timestamp()) if oldest is not None else 0.0,
        )
        yield _gauge(
            "runsvc_stale_threshold_seconds",
            "A running run is stale once its heartbeat is older than this.",
            self._policy.stale_after / timedelta(seconds=1),
        )
        ages = HistogramMetricFamily(
            "runsvc_running_heartbeat_age_seconds",
            "Heartbeat ages of the running runs at scrape time.",
        )
        buckets = [(_le(bound), float(live.age_buckets[bound])) for bound in AGE_BUCKETS]
        ages.add_metric([], [*buckets, ("+Inf", float(live.running))], live.age_sum_seconds)
        yield ages
        yield _gauge(
            "runsvc_runs_locked_without_heartbeat",
            "Live runs that a worker holds but that never heartbeated.",
            live.locked_without_heartbeat,
        )
        yield _gauge(
            "runsvc_runs_cancel_overdue",
            "Running runs whose cancel request is older than the cancel grace.",
            live.cancel_overdue,
        )
        backlog, oldest_age = self._slot_backlog()
        yield _gauge(
            "runsvc_slot_release_backlog",
            "Slot releases recorded but not yet applied to the slot backend.",
            backlog,
        )
        yield _gauge(
            "runsvc_slot_release_oldest_age_seconds",
            "Age of the oldest slot release still waiting (0 when none waits).",
            oldest_age,
        )
        if self._tenant_limit:
            tenants = GaugeMetricFamily(
                "runsvc_tenant_active_runs",
                f"Pending and running runs per tenant (beyond {self._tenant_limit} tenants, "
                f"summed as tenant={stats.OTHER_TENANTS!r}).",
                labels=["tenant", "state"],
            )
            for (tenant, state), count in sorted(per_tenant.items()):
                tenants.add_metric([tenant, state], count)
            yield tenants


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _le(bound: float) -> str:
    return repr(float(bound))
