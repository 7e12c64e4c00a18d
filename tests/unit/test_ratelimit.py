"""Token buckets, on a fake monotonic clock."""

from __future__ import annotations

import pytest

from runsvc.errors import RateLimited
from runsvc.ratelimit import DEFAULT_LIMITS, RateLimiter
from runsvc.settings import RATE_CLASSES


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_class_has_a_default() -> None:
    assert set(DEFAULT_LIMITS) == set(RATE_CLASSES)


def test_the_burst_then_the_rate() -> None:
    ticks = Ticks()
    limiter = RateLimiter({"read": (2.0, 3.0)}, monotonic=ticks)
    for _ in range(3):
        limiter.take("read", "t1")
    with pytest.raises(RateLimited) as refused:
        limiter.take("read", "t1")
    assert refused.value.retry_after_seconds == pytest.approx(0.5)
    assert refused.value.rate_class == "read"
    ticks.now += 0.5
    limiter.take("read", "t1")
    with pytest.raises(RateLimited):
        limiter.take("read", "t1")


def test_tenants_and_classes_have_separate_budgets() -> None:
    ticks = Ticks()
    limiter = RateLimiter({"read": (1.0, 1.0), "heartbeat": (1.0, 1.0)}, monotonic=ticks)
    limiter.take("read", "t1")
    with pytest.raises(RateLimited):
        limiter.take("read", "t1")
    limiter.take("read", "t2")  # another tenant
    limiter.take("heartbeat", "t1")  # another class of the same tenant


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    ticks = Ticks()
    limiter = RateLimiter({"write": (10.0, 2.0)}, monotonic=ticks)
    limiter.take("write", "t1")
    ticks.now += 3600
    limiter.take("write", "t1")
    limiter.take("write", "t1")
    with pytest.raises(RateLimited):
        limiter.take("write", "t1")
