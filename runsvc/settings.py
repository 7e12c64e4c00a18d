"""Settings: one object, read once from ``RUNSVC_*`` environment variables.

Every value is checked at start, and every problem is reported in one clear
message naming the variable. The defaults are the seed's values and are
listed in the README.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from runsvc.domain import LivenessPolicy
from runsvc.slots import SlotLimits

T = TypeVar("T")


class SettingsError(ValueError):
    """The environment holds settings runsvc cannot use."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    database_url: str = ""
    grpc_address: str = "127.0.0.1:50051"
    stale_after_seconds: float = 30.0
    reap_interval_seconds: float = 5.0
    startup_cleanup_after_seconds: float = 300.0
    cancel_grace_seconds: float = 60.0
    tenant_slots: int = 10
    tenant_slot_overrides: Mapping[str, int] = field(default_factory=dict)
    jwt_secret: str | None = None
    grpc_max_workers: int = 32
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    # Concurrency slots in Redis (unset: the store-backed slots, the embedded default).
    redis_url: str = ""
    redis_key_prefix: str = "runsvc:"
    redis_timeout_seconds: float = 0.5
    slot_ttl_seconds: float = 120.0
    slot_orphan_grace_seconds: float = 10.0
    slot_reconcile_interval_seconds: float = 30.0
    slot_relay_interval_seconds: float = 1.0
    slot_relay_max_backoff_seconds: float = 5.0
    # Test-only: commit slot releases but never apply them (crash tests). Off by default.
    testonly_hold_slot_releases: bool = False

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'runsvc.db'}"

    @property
    def jwt_secret_file(self) -> Path:
        return self.data_dir / "jwt-secret"

    def liveness(self) -> LivenessPolicy:
        return LivenessPolicy(
            stale_after=timedelta(seconds=self.stale_after_seconds),
            startup_cleanup_after=timedelta(seconds=self.startup_cleanup_after_seconds),
            cancel_grace=timedelta(seconds=self.cancel_grace_seconds),
        )

    def slot_limits(self) -> SlotLimits:
        return SlotLimits(default=self.tenant_slots, per_tenant=dict(self.tenant_slot_overrides))


MAX_SECONDS = 7 * 24 * 3600.0


def _positive_float(raw: str) -> float:
    value = float(raw)
    # math.isfinite first: "inf" and "1e400" parse, and would overflow timedelta later.
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds greater than 0 and at most {MAX_SECONDS:g}")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


def _overrides(raw: str) -> dict[str, int]:
    """``tenant-a=5,tenant-b=20``"""
    result: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        tenant, _, limit = item.partition("=")
        if not tenant or not limit:
            raise ValueError("must look like tenant-a=5,tenant-b=20")
        result[tenant.strip()] = _positive_int(limit.strip())
    return result


def _address(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:50051")
    return raw


def _secret(raw: str) -> str:
    if len(raw.encode()) < 32:
        raise ValueError("must be at least 32 bytes (an HS256 key as long as its hash)")
    return raw


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def _key_prefix(raw: str) -> str:
    if len(raw) > 64 or any(c.isspace() for c in raw):
        raise ValueError("must be at most 64 characters, without spaces")
    return raw


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in {"1", "true", "0", "false"}:
        raise ValueError("must be 1, true, 0 or false")
    return value in {"1", "true"}


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


_PARSERS: dict[str, tuple[str, Callable[[str], object]]] = {
    "RUNSVC_DATA_DIR": ("data_dir", Path),
    "RUNSVC_DATABASE_URL": ("database_url", str),
    "RUNSVC_GRPC_ADDRESS": ("grpc_address", _address),
    "RUNSVC_STALE_AFTER_SECONDS": ("stale_after_seconds", _positive_float),
    "RUNSVC_REAP_INTERVAL_SECONDS": ("reap_interval_seconds", _positive_float),
    "RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS": ("startup_cleanup_after_seconds", _positive_float),
    "RUNSVC_CANCEL_GRACE_SECONDS": ("cancel_grace_seconds", _positive_float),
    "RUNSVC_TENANT_SLOTS": ("tenant_slots", _positive_int),
    "RUNSVC_TENANT_SLOT_OVERRIDES": ("tenant_slot_overrides", _overrides),
    "RUNSVC_JWT_SECRET": ("jwt_secret", _secret),
    "RUNSVC_GRPC_MAX_WORKERS": ("grpc_max_workers", _positive_int),
    "RUNSVC_SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", _positive_float),
    "RUNSVC_LOG_LEVEL": ("log_level", _log_level),
    "RUNSVC_REDIS_URL": ("redis_url", _redis_url),
    "RUNSVC_REDIS_KEY_PREFIX": ("redis_key_prefix", _key_prefix),
    "RUNSVC_REDIS_TIMEOUT_SECONDS": ("redis_timeout_seconds", _positive_float),
    "RUNSVC_SLOT_TTL_SECONDS": ("slot_ttl_seconds", _positive_float),
    "RUNSVC_SLOT_ORPHAN_GRACE_SECONDS": ("slot_orphan_grace_seconds", _positive_float),
    "RUNSVC_SLOT_RECONCILE_INTERVAL_SECONDS": ("slot_reconcile_interval_seconds", _positive_float),
    "RUNSVC_SLOT_RELAY_INTERVAL_SECONDS": ("slot_relay_interval_seconds", _positive_float),
    "RUNSVC_SLOT_RELAY_MAX_BACKOFF_SECONDS": ("slot_relay_max_backoff_seconds", _positive_float),
    "RUNSVC_TESTONLY_HOLD_SLOT_RELEASES": ("testonly_hold_slot_releases", _flag),
}


_SECRETS = frozenset({"RUNSVC_JWT_SECRET", "RUNSVC_REDIS_URL"})


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    problems: list[str] = []
    for name, (attribute, parse) in _PARSERS.items():
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            values[attribute] = parse(raw)
        except ValueError as error:
            shown = "(hidden)" if name in _SECRETS else repr(raw)
            problems.append(f"{name}={shown}: {error}")
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.startup_cleanup_after_seconds < settings.stale_after_seconds:
        raise SettingsError(
            "invalid settings:\n  RUNSVC_STARTUP_CLEANUP_AFTER_SECONDS must not be shorter "
            "than RUNSVC_STALE_AFTER_SECONDS"
        )
    if settings.redis_url and settings.slot_ttl_seconds <= settings.stale_after_seconds:
        raise SettingsError(
            "invalid settings:\n  RUNSVC_SLOT_TTL_SECONDS must be longer than "
            "RUNSVC_STALE_AFTER_SECONDS (a live worker's slots must not expire)"
        )
    return settings
