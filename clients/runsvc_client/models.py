"""Plain, typed values returned by the clients, converted from the protobuf messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from runsvc_client.v1 import run_service_pb2 as pb


class RunState(enum.Enum):
    PENDING = "pending"
    """Created, no worker yet."""
    RUNNING = "running"
    """A worker holds the lease."""
    COMPLETED = "completed"
    """The worker finished it."""
    CANCELLED = "cancelled"
    """Cancel acknowledged, force-cancelled, or a cancel-requested run that lost its worker."""
    STOPPED = "stopped"
    """Liveness lost: heartbeat timeout, startup cleanup."""
    FAILED = "failed"
    """The worker reported a fatal error."""
    UNSPECIFIED = "unspecified"
    """A state this client does not know (a newer server)."""

    @property
    def active(self) -> bool:
        return self in (RunState.PENDING, RunState.RUNNING)

    @classmethod
    def from_proto(cls, value: int) -> RunState:
        name = pb.RunState.Name(value) if value in pb.RunState.values() else ""
        return cls.__members__.get(name.removeprefix("RUN_STATE_"), cls.UNSPECIFIED)

    def to_proto(self) -> pb.RunState:
        value: pb.RunState = pb.RunState.Value(f"RUN_STATE_{self.name}")
        return value


class RunOutcome(enum.Enum):
    """How a worker ends its run."""

    COMPLETED = pb.RUN_OUTCOME_COMPLETED
    FAILED = pb.RUN_OUTCOME_FAILED
    CANCELLED = pb.RUN_OUTCOME_CANCELLED


def _time(value: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    if not present:
        return None
    converted: datetime = value.ToDatetime(tzinfo=UTC)
    return converted


@dataclass(frozen=True)
class JobCounts:
    total: int = 0
    queued: int = 0
    in_progress: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Run:
    id: str
    tenant_id: str
    state: RunState
    stop_reason: str
    cancel_requested: bool
    cancel_reason: str
    worker_id: str
    lease_epoch: int
    request_id: str
    job_counts: JobCounts
    create_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    last_heartbeat_time: datetime | None
    cancel_request_time: datetime | None
    number: int = 0
    """Unique and increasing, assigned by runsvc: the run's short name (0 from an older server)."""

    @classmethod
    def from_proto(cls, run: pb.Run) -> Run:
        c = run.job_counts
        return cls(
            id=run.id,
            tenant_id=run.tenant_id,
            state=RunState.from_proto(run.state),
            stop_reason=run.stop_reason,
            cancel_requested=run.cancel_requested,
            cancel_reason=run.cancel_reason,
            worker_id=run.worker_id,
            lease_epoch=run.lease_epoch,
            request_id=run.request_id,
            job_counts=JobCounts(c.total, c.queued, c.in_progress, c.completed, c.failed),
            create_time=_time(run.create_time, run.HasField("create_time")),
            start_time=_time(run.start_time, run.HasField("start_time")),
            end_time=_time(run.end_time, run.HasField("end_time")),
            last_heartbeat_time=_time(run.last_heartbeat_time, run.HasField("last_heartbeat_time")),
            cancel_request_time=_time(run.cancel_request_time, run.HasField("cancel_request_time")),
            number=run.number,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: enums by value, times as ISO 8601 (or null)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, RunState):
                value = value.value
            elif isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, JobCounts):
                value = dict(value.__dict__)
            out[name] = value
        return out


@dataclass(frozen=True)
class Job:
    """A job handed to the lease holder: it is in progress until reported."""

    id: str
    external_id: str
    payload: bytes

    @classmethod
    def from_proto(cls, job: pb.Job) -> Job:
        return cls(id=job.id, external_id=job.external_id, payload=job.payload)


@dataclass(frozen=True)
class JobSpec:
    """A job to create: the caller's own id (unique in the run) and an opaque payload."""

    external_id: str
    payload: bytes = b""


@dataclass(frozen=True)
class JobResult:
    job_id: str
    ok: bool
    error: str = ""

    @classmethod
    def completed(cls, job_id: str) -> JobResult:
        return cls(job_id, ok=True)

    @classmethod
    def failed(cls, job_id: str, error: str) -> JobResult:
        return cls(job_id, ok=False, error=error)

    def to_proto(self) -> pb.JobResult:
        outcome = pb.JOB_OUTCOME_COMPLETED if self.ok else pb.JOB_OUTCOME_FAILED
        return pb.JobResult(job_id=self.job_id, outcome=outcome, error=self.error)


@dataclass(frozen=True)
class Reported:
    recorded: int
    """Results recorded by this call."""
    duplicates: int
    """Results that were already recorded (a retried call)."""


@dataclass(frozen=True)
class ForceCancelled:
    run: Run
    cancelled_jobs: int
    """Queued and in-progress jobs failed by this call."""
    released_slots: int
    """Concurrency slots freed by this call."""
