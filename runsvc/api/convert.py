"""Proto messages ⇄ domain values. Enum tables are checked total by a unit test."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from runsvc.domain import Job, JobOutcome, JobResult, JobSpec, JobState, Run, RunOutcome, RunState
from runsvc.errors import FieldViolation, InvalidArgument
from runsvc.validation import Limits
from runsvc_client.v1 import run_service_pb2 as pb

RUN_STATES: dict[RunState, int] = {
    RunState.PENDING: pb.RUN_STATE_PENDING,
    RunState.RUNNING: pb.RUN_STATE_RUNNING,
    RunState.COMPLETED: pb.RUN_STATE_COMPLETED,
    RunState.CANCELLED: pb.RUN_STATE_CANCELLED,
    RunState.STOPPED: pb.RUN_STATE_STOPPED,
    RunState.FAILED: pb.RUN_STATE_FAILED,
}
RUN_STATES_FROM_PROTO = {v: k for k, v in RUN_STATES.items()}

JOB_STATES: dict[JobState, int] = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.IN_PROGRESS: pb.JOB_STATE_IN_PROGRESS,
    JobState.COMPLETED: pb.JOB_STATE_COMPLETED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
}

JOB_OUTCOMES: dict[int, JobOutcome] = {
    pb.JOB_OUTCOME_COMPLETED: JobOutcome.COMPLETED,
    pb.JOB_OUTCOME_FAILED: JobOutcome.FAILED,
}

RUN_OUTCOMES: dict[int, RunOutcome] = {
    pb.RUN_OUTCOME_COMPLETED: RunOutcome.COMPLETED,
    pb.RUN_OUTCOME_FAILED: RunOutcome.FAILED,
    pb.RUN_OUTCOME_CANCELLED: RunOutcome.CANCELLED,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def run_to_proto(run: Run) -> pb.Run:
    counts = run.job_counts
    return pb.Run(
        id=run.id,
        number=run.number,
        tenant_id=run.tenant_id,
        state=RUN_STATES[run.state],  # type: ignore[arg-type]
        stop_reason=run.stop_reason or "",
        cancel_requested=run.cancel_requested,
        worker_id=run.worker_id or "",
        lease_epoch=run.lease_epoch,
        create_time=timestamp(run.create_time),
        start_time=timestamp(run.start_time),
        end_time=timestamp(run.end_time),
        last_heartbeat_time=timestamp(run.last_heartbeat_time),
        job_counts=pb.JobCounts(
            total=counts.total,
            queued=counts.queued,
            in_progress=counts.in_progress,
            completed=counts.completed,
            failed=counts.failed,
        ),
        request_id=run.request_id,
        cancel_reason=run.cancel_reason or "",
        cancel_request_time=timestamp(run.cancel_request_time),
    )


def job_to_proto(job: Job) -> pb.Job:
    return pb.Job(
        id=job.id,
        run_id=job.run_id,
        external_id=job.external_id,
        payload=job.payload,
        state=JOB_STATES[job.state],  # type: ignore[arg-type]
        error=job.error or "",
        late=job.late,
    )


# Repeated fields are counted before any item is converted: their length is known
# from the parsed message, so an oversized list costs one comparison, not a pass.
LIMITS = Limits()


def _at_most(field: str, messages: Sized, limit: int) -> None:
    if len(messages) > limit:
        raise InvalidArgument([FieldViolation(field, f"at most {limit} items")])


def job_specs(messages: Sequence[pb.JobSpec]) -> list[JobSpec]:
    _at_most("jobs", messages, LIMITS.max_jobs_per_run)
    return [JobSpec(external_id=m.external_id, payload=m.payload) for m in messages]


def job_results(messages: Sequence[pb.JobResult]) -> list[JobResult]:
    _at_most("results", messages, LIMITS.max_results_per_report)
    results, violations = [], []
    for i, m in enumerate(messages):
        outcome = JOB_OUTCOMES.get(m.outcome)
        if outcome is None:
            violations.append(
                FieldViolation(f"results[{i}].outcome", "must be COMPLETED or FAILED")
            )
            continue
        results.append(JobResult(job_id=m.job_id, outcome=outcome, error=m.error or None))
    if violations:
        raise InvalidArgument(violations)
    return results


def run_outcome(value: int) -> RunOutcome:
    outcome = RUN_OUTCOMES.get(value)
    if outcome is None:
        raise InvalidArgument([FieldViolation("outcome", "must be COMPLETED, FAILED or CANCELLED")])
    return outcome


def run_states(values: Sequence[int]) -> list[RunState]:
    """The states asked for, each once (asking twice for one state changes nothing)."""
    _at_most("states", values, len(RUN_STATES))
    states, violations = [], []
    for i, value in enumerate(values):
        state = RUN_STATES_FROM_PROTO.get(value)
        if state is None:
            violations.append(FieldViolation(f"states[{i}]", "must be a known run state"))
        elif state not in states:
            states.append(state)
    if violations:
        raise InvalidArgument(violations)
    return states
