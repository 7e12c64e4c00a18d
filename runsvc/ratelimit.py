"""Per-tenant token buckets, one per class of call (pure logic, injected clock).

Each class has its own budget, so a tenant that floods reads exhausts only
its read bucket: its heartbeats draw from another one and its runs never go
stale because of its own flood. Callers without a tenant (admins, fleet-wide
workers) are keyed by their subject.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from runsvc.errors import RateLimited

# Requests per second and burst, per tenant and class.
DEFAULT_LIMITS: dict[str, tuple[float, float]] = {
    "read": (50.0, 100.0),
    "write": (10.0, 20.0),
    "worker": (200.0, 400.0),
    "heartbeat": (20.0, 40.0),
}
# Idle (full) buckets are forgotten once there are this many, to bound memory.
MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        limits: Mapping[str, tuple[float, float]] | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self._monotonic = monotonic
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, rate_class: str, key: str) -> None:
        """Spend one token of ``key``'s ``rate_class`` bucket, or raise RateLimited."""
        rate, burst = self.limits[rate_class]
        now = self._monotonic()
        with self._lock:
            bucket = self._buckets.get((rate_class, key))
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._forget_idle(now)
                bucket = self._buckets[(rate_class, key)] = _Bucket(burst, now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / rate
        raise RateLimited(retry_after_seconds=wait, rate_class=rate_class)

    def _forget_idle(self, now: float) -> None:
        for name, bucket in list(self._buckets.items()):
            rate, burst = self.limits[name[0]]
            if bucket.tokens + (now - bucket.updated) * rate >= burst:
                del self._buckets[name]
