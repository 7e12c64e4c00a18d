"""Everything the server needs for metrics, built from its settings in one place."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from runsvc.clock import Clock
from runsvc.domain import LivenessPolicy
from runsvc.metrics.counters import MetricsObserver
from runsvc.metrics.grpc_server import GrpcMetrics
from runsvc.metrics.store_collector import SlotBacklog, StoreCollector, no_slot_backlog
from runsvc.store.engine import Database


@dataclass
class Metrics:
    registry: CollectorRegistry
    observer: MetricsObserver
    grpc: GrpcMetrics
    # None in the processes of `serve --workers N` but the first: one reads the store per scrape.
    store: StoreCollector | None


def build_metrics(
    *,
    db: Database,
    clock: Clock,
    policy: LivenessPolicy,
    reap_interval_seconds: float,
    tenant_series_limit: int = 0,
    slot_backlog: SlotBacklog = no_slot_backlog,
    store_gauges: bool = True,
) -> Metrics:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    store = None
    if store_gauges:
        store = StoreCollector(
            db, clock, policy, tenant_series_limit=tenant_series_limit, slot_backlog=slot_backlog
        )
        registry.register(store)
    return Metrics(
        registry=registry,
        observer=MetricsObserver(registry, reap_interval_seconds=reap_interval_seconds),
        grpc=GrpcMetrics(registry),
        store=store,
    )
