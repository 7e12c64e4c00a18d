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
    heartbeat_group_commit: bool = True
    heartbeat_batch_max: int = 256
    heartbeat_batch_delay_seconds: float = 0.002
    heartbeat_queue_max: int = 4096

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


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError("must be true or false")
    return value in {"true", "1", "yes"}


def _short_delay(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError("must be a number of seconds from 0 to 1")
    return value


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
    "RUNSVC_HEARTBEAT_GROUP_COMMIT": ("heartbeat_group_commit", _flag),
    "RUNSVC_HEARTBEAT_BATCH_MAX": ("heartbeat_batch_max", _positive_int),
    "RUNSVC_HEARTBEAT_BATCH_DELAY_SECONDS": ("heartbeat_batch_delay_seconds", _short_delay),
    "RUNSVC_HEARTBEAT_QUEUE_MAX": ("heartbeat_queue_max", _positive_int),
}


_SECRETS = frozenset({"RUNSVC_JWT_SECRET"})


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
    return settings
