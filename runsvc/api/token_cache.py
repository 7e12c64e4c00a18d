"""Verified bearer tokens, remembered: a worker sends the same token with every heartbeat.

Checking an HS256 signature and the claims costs more than a cached look-up,
and it is the same answer until the token expires. Only tokens that verified
are kept, each until its ``exp`` (no leeway: an entry never outlives what
:func:`runsvc.tokens.verify` would accept), in a bounded least-recently-used
table keyed by the token string itself.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import jwt

from runsvc import tokens
from runsvc.tokens import Principal


class VerifiedTokens:
    def __init__(
        self,
        secret: str,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        """The caller behind ``token``; raises :class:`runsvc.errors.Unauthenticated`."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(token)
            if entry is not None:
                if now < entry[1]:
                    self._entries.move_to_end(token)
                    return entry[0]
                del self._entries[token]
        principal = tokens.verify(self._secret, token)
        # The signature is good: read exp without checking it again.
        claims = jwt.decode(token, options={"verify_signature": False})
        expires = float(claims["exp"])
        if now < expires:
            with self._lock:
                self._entries[token] = (principal, expires)
                self._entries.move_to_end(token)
                while len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return principal

    def __len__(self) -> int:
        return len(self._entries)
