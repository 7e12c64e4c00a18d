"""Retrying transient failures with capped, jittered exponential backoff."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

# A blip, not a refusal: the call may not have reached the server, or the
# server could not reach its database. Other codes are answers, not blips.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryPolicy:
    """How an idempotent call is retried after a transient failure."""

    attempts: int = 4
    """Tries in all, the first included; 1 disables retries."""
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): "full jitter"."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return random.uniform(cap / 2, cap)


NO_RETRY = RetryPolicy(attempts=1)
