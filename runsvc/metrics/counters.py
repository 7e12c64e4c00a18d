"""Counters of what the service did, fed through the service's observer seam."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

# Where a run's end was noticed or decided: stale detection on read, by the
# reaper, at startup, from the command line, or by the calls that end runs.
DETECTED_BY = ("read", "reaper", "startup", "cli", "worker", "cancel", "force_cancel")
DENIAL_KINDS = ("unauthenticated", "role", "run_not_visible")
# Background jobs whose work replicas share, and what became of one of their passes.
BACKGROUND_JOBS = ("reaper", "slot_reconciler")
PASS_RESULTS = ("done", "skipped")


class MetricsObserver:
    """Implements :class:`runsvc.service.observer.Observer` with Prometheus counters."""

    def __init__(self, registry: CollectorRegistry, *, reap_interval_seconds: float) -> None:
        self.heartbeats = Counter(
            "runsvc_heartbeats_total",
            "Heartbeats recorded from lease holders.",
            registry=registry,
        )
        self.fenced_writes = Counter(
            "runsvc_fenced_writes_total",
            "Worker writes refused (or recorded late) because their lease was no longer current.",
            registry=registry,
        )
        self.finalizations = Counter(
            "runsvc_run_finalizations_total",
            "Runs that reached a terminal state, by state, reason and where it was detected.",
            ["state", "reason", "detected_by"],
            registry=registry,
        )
        self.force_cancels = Counter(
            "runsvc_force_cancels_total",
            "ForceCancel calls that ended a run.",
            registry=registry,
        )
        self.denials = Counter(
            "runsvc_security_denials_total",
            "Refused calls: no or bad token, wrong role, or a run the caller may not see.",
            ["kind"],
            registry=registry,
        )
        self.slot_releases = Counter(
            "runsvc_slot_releases_total",
            "Concurrency slots released because their run ended with jobs in progress.",
            ["cause"],
            registry=registry,
        )
        self.reaper_last_success = Gauge(
            "runsvc_reaper_last_success_timestamp_seconds",
            "When this replica's reaper last completed a pass (Unix time).",
            registry=registry,
        )
        self.reaper_last_duration = Gauge(
            "runsvc_reaper_last_pass_duration_seconds",
            "How long this replica's last completed reaper pass took.",
            registry=registry,
        )
        self.reaper_interval = Gauge(
            "runsvc_reaper_interval_seconds",
            "The configured time between reaper passes (RUNSVC_REAP_INTERVAL_SECONDS).",
            registry=registry,
        )
        self.reaper_interval.set(reap_interval_seconds)
        self.reaper_breaker_trips = Counter(
            "runsvc_reaper_breaker_trips_total",
            "Reaper passes that stopped nothing: too many running runs looked silent at once.",
            registry=registry,
        )
        self.background_passes = Counter(
            "runsvc_background_passes_total",
            "Passes of background jobs by this replica: done, or skipped because another "
            "replica held the work (the reconciler's lease; every stale run already claimed).",
            ["job", "result"],
            registry=registry,
        )
        # Series that exist from the start, so that rate() sees the first increment.
        for kind in DENIAL_KINDS:
            self.denials.labels(kind=kind)
        for job in BACKGROUND_JOBS:
            for result in PASS_RESULTS:
                self.background_passes.labels(job=job, result=result)
        self.slot_releases.labels(cause="run_ended")

    # --- the Observer protocol ---------------------------------------------------

    def audited(self, line: Mapping[str, Any]) -> None:
        if line.get("tag") == "SECURITY":
            self.denied("run_not_visible")
            return
        detected_by = line.get("detected_by")
        if detected_by is None:
            return
        self.finalizations.labels(
            state=str(line.get("state") or ""),
            reason=str(line.get("reason") or "NONE"),
            detected_by=str(detected_by),
        ).inc()
        if line.get("tag") == "FORCE_CANCEL":
            self.force_cancels.inc()
        released = int(line.get("released_slots") or 0)
        if released:
            self.slot_releases.labels(cause="run_ended").inc(released)

    def heartbeat(self) -> None:
        self.heartbeats.inc()

    def lease_lost(self) -> None:
        self.fenced_writes.inc()

    def reaper_passed(self, *, duration_seconds: float) -> None:
        self.reaper_last_duration.set(duration_seconds)
        self.reaper_last_success.set(time.time())

    def reaper_held_back(self, *, stale: int, running: int) -> None:
        self.reaper_breaker_trips.inc()

    def background_pass(self, job: str, *, done: bool) -> None:
        self.background_passes.labels(job=job, result="done" if done else "skipped").inc()

    # --- called from the gRPC edge ---------------------------------------------------

    def denied(self, kind: str) -> None:
        self.denials.labels(kind=kind).inc()
