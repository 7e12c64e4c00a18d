"""Bearer tokens: JWTs carrying a role and, for most callers, a tenant.

Claims: ``sub`` (who; required for workers, without "/"), ``role`` (worker,
backend or admin), ``tenant`` (required for backends, refused for admins,
absent for fleet-wide workers), ``iat`` (never judged against this clock; it
only bounds the lifetime), ``exp`` (always required, at most the maximum
lifetime after ``iat``), ``nbf`` (checked when present), and ``iss``/``aud``
(required and checked when the server is configured with them). See
:func:`_principal` for the exact rules.

Algorithms come from an allowlist. HS256 verifies with the shared secret only;
RS256 and ES256 verify with public keys only (a PEM file of one or more keys,
or a JWKS file), so a public key can never be used as an HMAC secret (key
confusion) and ``alg: none`` is never accepted. Every refusal carries the same
message, so that an attacker learns nothing from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from runsvc.errors import Unauthenticated

ALGORITHM = "HS256"
SUPPORTED_ALGORITHMS = ("HS256", "RS256", "ES256")
ROLES = frozenset({"worker", "backend", "admin"})
LEEWAY_SECONDS = 5
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
MAX_TOKEN_BYTES = 8 * 1024
MAX_TENANT_LENGTH = 128
MAX_SUBJECT_LENGTH = 256
# The longest a token may live from its issue: a stolen token is good for a day at most.
MAX_LIFETIME_SECONDS = 24 * 3600.0
REFUSED = "invalid or expired token"
# How often a key file is checked for a newer version (key rotation without restart).
KEY_RELOAD_SECONDS = 1.0
# Verified tokens remembered, and for how long at most (a removed key stops working then).
VERIFIED_CACHE_SIZE = 4096
VERIFIED_CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str
    tenant_id: str | None


def issue(
    secret: str,
    *,
    role: str,
    tenant_id: str | None,
    ttl_seconds: int,
    subject: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token; ``issuer``/``audience`` are set when the server checks them."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(sorted(ROLES))}")
    if role == "backend" and not tenant_id:
        raise ValueError("a backend token needs a tenant")
    if role == "admin" and tenant_id:
        raise ValueError("an admin token carries no tenant (its requests name one)")
    if role == "worker" and subject is not None and "/" in subject:
        raise ValueError("a worker's subject has no '/' (its processes are SUBJECT/1, SUBJECT/2)")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject or f"{role}:{tenant_id or '*'}",
        "role": role,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if tenant_id:
        claims["tenant"] = tenant_id
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


@dataclass(frozen=True)
class PublicKey:
    key: Any  # an RSA or EC public key of ``cryptography``
    kid: str | None = None


def _algorithm_fits(algorithm: str, key: Any) -> bool:
    if algorithm == "RS256":
        return isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
    if algorithm == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    return False


def load_pem_keys(text: str) -> list[PublicKey]:
    """Every ``PUBLIC KEY`` block of a PEM file (several during a key rotation)."""
    marker = "-----END PUBLIC KEY-----"
    blocks = [block + marker for block in text.split(marker) if "-----BEGIN" in block]
    if not blocks:
        raise ValueError("no PEM public key found")
    return [PublicKey(load_pem_public_key(block.strip().encode())) for block in blocks]


def load_jwks(text: str) -> list[PublicKey]:
    """The public keys of a JWKS document (RFC 7517); private parts are refused."""
    document = json.loads(text)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError("a JWKS file needs a non-empty 'keys' list")
    loaded = []
    for entry in keys:
        if not isinstance(entry, dict) or "d" in entry or entry.get("kty") == "oct":
            raise ValueError("a JWKS file may hold only RSA or EC public keys")
        jwk = jwt.PyJWK(entry)
        loaded.append(PublicKey(jwk.key, kid=entry.get("kid")))
    return loaded


class KeyFile:
    """Public keys from a file, reloaded when the file changes (rotation without restart)."""

    def __init__(self, path: Path, parse: Callable[[str], list[PublicKey]]) -> None:
        self._path = path
        self._parse = parse
        self._lock = threading.Lock()
        self._checked = 0.0
        self._mtime = path.stat().st_mtime_ns
        self._keys = parse(path.read_text())

    def keys(self) -> list[PublicKey]:
        now = time.monotonic()
        if now - self._checked < KEY_RELOAD_SECONDS:
            return self._keys
        with self._lock:
            self._checked = now
            with contextlib.suppress(OSError, ValueError):  # keep the last good keys
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._keys = self._parse(self._path.read_text())
                    self._mtime = mtime
        return self._keys


class Verifier:
    """Checks tokens against the allowlist of algorithms and the configured keys."""

    def __init__(
        self,
        *,
        algorithms: Sequence[str] = (ALGORITHM,),
        secret: str | None = None,
        public_keys: Callable[[], Sequence[PublicKey]] | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = LEEWAY_SECONDS,
        max_lifetime: float = MAX_LIFETIME_SECONDS,
    ) -> None:
        unknown = set(algorithms) - set(SUPPORTED_ALGORITHMS)
        if unknown or not algorithms:
            raise ValueError(f"algorithms must be among {', '.join(SUPPORTED_ALGORITHMS)}")
        if "HS256" in algorithms and not secret:
            raise ValueError("HS256 needs a secret")
        if set(algorithms) - {"HS256"} and public_keys is None:
            raise ValueError("RS256 and ES256 need public keys")
        self.algorithms = tuple(algorithms)
        self._secret = secret
        self._public_keys = public_keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._verified: dict[str, tuple[Principal, float]] = {}

    def _candidate_keys(self, algorithm: str, kid: object) -> list[Any]:
        if algorithm == "HS256":
            return [self._secret]
        assert self._public_keys is not None
        fitting = [k for k in self._public_keys() if _algorithm_fits(algorithm, k.key)]
        if isinstance(kid, str) and any(k.kid for k in fitting):
            fitting = [k for k in fitting if k.kid == kid]
        return [k.key for k in fitting]

    def verify(self, token: str) -> Principal:
        """The caller behind ``token``; every refusal says the same thing.

        A token that verified is remembered for a short while (never past its
        expiry), so that a client calling many times with one token does not
        pay for a signature check each time; refusals are never remembered.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(REFUSED)
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        principal, expires = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, min(expires, now + VERIFIED_CACHE_SECONDS))
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise Unauthenticated(REFUSED) from error
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise Unauthenticated(REFUSED)
        required = (
            ["exp", "role"]
            + (["iss"] if self._issuer else [])
            + (["aud"] if self._audience else [])
        )
        for key in self._candidate_keys(algorithm, header.get("kid")):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    # With no audience configured, a token that names one (it was
                    # minted for some other service) is refused.
                    # "Issued at" is not a validity bound (exp and nbf are): checking
                    # it would make a replica whose clock runs behind the issuer's
                    # refuse every fresh token, and its workers' runs then stop.
                    options={"require": required, "verify_iat": False},
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway,
                )
            except jwt.InvalidSignatureError:
                continue  # another key of the set may have signed it
            except jwt.PyJWTError as error:
                raise Unauthenticated(REFUSED) from error
            principal = _principal(claims, now=time.time(), max_lifetime=self._max_lifetime)
            return principal, float(claims["exp"])
        raise Unauthenticated(REFUSED)


def _clean_name(value: object, *, max_length: int) -> bool:
    """A non-empty string of printable characters (no NUL, no control character)."""
    return isinstance(value, str) and 0 < len(value) <= max_length and value.isprintable()


def _principal(claims: dict[str, Any], *, now: float, max_lifetime: float) -> Principal:
    """The caller the claims name, or a refusal: every claim strict, nothing guessed.

    ``role`` is one known string; a ``tenant``, when present, is a clean
    non-empty string, required for a backend and refused for an admin (an admin
    acts for the tenant its request names, never for one its token pins); a
    worker needs a ``sub`` without "/" (its processes are ``sub/1``, ``sub/2``,
    so a worker named with a slash would pass for another's process); and the
    token may live at most ``max_lifetime`` seconds from its issue (or from now).
    """
    role, tenant, subject = claims.get("role"), claims.get("tenant"), claims.get("sub")
    if not isinstance(role, str) or role not in ROLES:
        raise Unauthenticated(REFUSED)
    if subject is not None and not _clean_name(subject, max_length=MAX_SUBJECT_LENGTH):
        raise Unauthenticated(REFUSED)
    if role == "worker" and (subject is None or "/" in subject):
        raise Unauthenticated(REFUSED)
    if tenant is not None and not _clean_name(tenant, max_length=MAX_TENANT_LENGTH):
        raise Unauthenticated(REFUSED)
    if (role == "backend" and tenant is None) or (role == "admin" and tenant is not None):
        raise Unauthenticated(REFUSED)
    issued = claims.get("iat")
    start = issued if isinstance(issued, int | float) and not isinstance(issued, bool) else now
    if float(claims["exp"]) - min(float(start), now) > max_lifetime:
        raise Unauthenticated(REFUSED)
    return Principal(subject=subject or role, role=role, tenant_id=tenant)


def verify(secret: str, token: str) -> Principal:
    """The caller behind an HS256 ``token`` signed with ``secret``."""
    return Verifier(algorithms=(ALGORITHM,), secret=secret).verify(token)


def load_or_create_secret(path: Path) -> str:
    """The signing secret kept in the data folder, created on first use (mode 0600).

    Created under a temporary name and linked into place, so that a server and
    a command starting together agree on one secret and never read half a file.
    Only ``serve`` creates it; every other command reads it with :func:`read_secret`.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48) + "\n")
            with contextlib.suppress(FileExistsError):  # another process won: use its secret
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return read_secret(path)


class SecretFileError(ValueError):
    """The secret file is missing, or anyone but its owner could have read or replaced it."""


def read_secret(path: Path) -> str:
    """The secret in ``path``, opened without following a link and refused unless private.

    A secret that others can read is no secret: the file must be a regular file
    owned by this user (or by root, as a mounted Kubernetes Secret is), that no
    one but its owner and group can read and no one but its owner can write.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as error:
        raise SecretFileError(f"there is no signing secret at {path}") from error
    except OSError as error:  # ELOOP: the path is a symbolic link
        raise SecretFileError(
            f"the signing secret {path} is a link or unreadable: {error}"
        ) from error
    with os.fdopen(fd) as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise SecretFileError(f"the signing secret {path} is not a regular file")
        if status.st_uid not in (os.geteuid(), 0):
            raise SecretFileError(f"the signing secret {path} belongs to another user")
        if status.st_mode & 0o027:
            raise SecretFileError(
                f"the signing secret {path} can be read or changed by others "
                f"(mode {stat.S_IMODE(status.st_mode):04o}; chmod 600 it)"
            )
        secret = handle.read().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"the signing secret in {path} is shorter than {MIN_SECRET_BYTES} bytes"
        )
    return secret
