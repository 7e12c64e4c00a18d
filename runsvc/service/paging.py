"""ListRuns page tokens: a position in the listing, signed so that only runsvc makes them.

A token is the position (the last run's creation time and id) and an HMAC of
it. Anything else — edited, truncated, made up — is refused INVALID_ARGUMENT
before it is parsed, so no crafted time (one without a zone, year 9999 with an
odd offset) ever reaches the date parser or the query. Replicas that share
the key (derived from the signing secret) accept each other's tokens; a key
of the process's own still pages correctly against that one replica.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from datetime import datetime

from runsvc.domain import Run
from runsvc.errors import FieldViolation, InvalidArgument
from runsvc.store.runs import PageCursor

_SIGNATURE_BYTES = 16


def derive_key(secret: str) -> bytes:
    """The page-token key of every replica that shares ``secret`` (never the secret itself)."""
    return hmac.new(secret.encode(), b"runsvc page tokens", hashlib.sha256).digest()


class PageTokens:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]

    def encode(self, run: Run) -> str:
        body = f"{run.create_time.isoformat()}|{run.id}".encode()
        return base64.urlsafe_b64encode(self._sign(body) + body).decode()

    def decode(self, token: str) -> PageCursor:
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise _refused() from None
        signature, body = raw[:_SIGNATURE_BYTES], raw[_SIGNATURE_BYTES:]
        if not hmac.compare_digest(signature, self._sign(body)):
            raise _refused()
        created, _, run_id = body.decode().partition("|")
        # Signed by this key, so written by encode() above: these parse.
        return PageCursor(datetime.fromisoformat(created), str(uuid.UUID(run_id)))


def _refused() -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", "is not a token returned by ListRuns")])
