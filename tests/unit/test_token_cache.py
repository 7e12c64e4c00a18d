"""The cache of verified tokens answers as verify does, and forgets a token when it expires."""

from __future__ import annotations

import time

import jwt
import pytest

from runsvc import tokens
from runsvc.api.token_cache import VerifiedTokens
from runsvc.errors import Unauthenticated

SECRET = "unit-test-secret-long-enough-for-hs256"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_cached_token_gives_the_same_principal() -> None:
    cache = VerifiedTokens(SECRET)
    token = tokens.issue(SECRET, role="worker", tenant_id="t1", ttl_seconds=60, subject="w-1")
    first = cache.verify(token)
    assert first == tokens.verify(SECRET, token)
    assert cache.verify(token) is first
    assert len(cache) == 1


def test_an_entry_is_dropped_at_its_exp() -> None:
    clock = Clock()
    cache = VerifiedTokens(SECRET, clock=clock)
    token = tokens.issue(SECRET, role="worker", tenant_id="t1", ttl_seconds=30)
    cache.verify(token)
    assert len(cache) == 1
    clock.now += 31
    # Past exp the cache does not answer: verify decides again (on the real
    # clock, so it still accepts here), and the token is not stored again.
    cache.verify(token)
    assert len(cache) == 0


def test_a_bad_token_is_refused_and_not_cached() -> None:
    cache = VerifiedTokens(SECRET)
    forged = jwt.encode({"role": "admin", "exp": int(time.time()) + 60}, "x" * 40, "HS256")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            cache.verify(forged)
    assert len(cache) == 0


def test_the_table_is_bounded_least_recently_used_first() -> None:
    cache = VerifiedTokens(SECRET, max_entries=2)
    issued = [
        tokens.issue(SECRET, role="worker", tenant_id=f"t{i}", ttl_seconds=60) for i in range(3)
    ]
    cache.verify(issued[0])
    cache.verify(issued[1])
    cache.verify(issued[0])  # most recently used now
    cache.verify(issued[2])  # evicts issued[1]
    assert len(cache) == 2
    assert set(cache._entries) == {issued[0], issued[2]}
