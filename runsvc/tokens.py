"""Bearer tokens: HS256 JWTs carrying a role and, for most callers, a tenant.

Claims: ``sub`` (who), ``role`` (worker, backend or admin), ``tenant``
(required for backends; absent only for admins and fleet-wide workers),
``iat`` and ``exp`` (always checked).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from runsvc.errors import Unauthenticated

ALGORITHM = "HS256"
ROLES = frozenset({"worker", "backend", "admin"})
LEEWAY_SECONDS = 5
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str
    tenant_id: str | None


def issue(
    secret: str, *, role: str, tenant_id: str | None, ttl_seconds: int, subject: str | None = None
) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(sorted(ROLES))}")
    if role == "backend" and not tenant_id:
        raise ValueError("a backend token needs a tenant")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject or f"{role}:{tenant_id or '*'}",
        "role": role,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if tenant_id:
        claims["tenant"] = tenant_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> Principal:
    """The caller behind ``token``; every refusal says as little as possible."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "role"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.PyJWTError as error:
        raise Unauthenticated("invalid or expired token") from error
    role, tenant = claims.get("role"), claims.get("tenant")
    if role not in ROLES or (tenant is not None and not isinstance(tenant, str)):
        raise Unauthenticated("invalid or expired token")
    if role == "backend" and not tenant:
        raise Unauthenticated("invalid or expired token")
    return Principal(subject=str(claims.get("sub", role)), role=role, tenant_id=tenant or None)


def load_or_create_secret(path: Path) -> str:
    """The signing secret kept in the data folder, created on first use (mode 0600).

    Created under a temporary name and linked into place, so that a server and
    a command starting together agree on one secret and never read half a file.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48) + "\n")
            with contextlib.suppress(FileExistsError):  # another process won: use its secret
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the signing secret in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret
