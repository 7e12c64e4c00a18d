"""Proto ⇄ domain conversions: total enum tables and faithful messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from runsvc.api import convert
from runsvc.domain import (
    Job,
    JobCounts,
    JobOutcome,
    JobState,
    Run,
    RunOutcome,
    RunState,
)
from runsvc.errors import InvalidArgument
from runsvc_client.v1 import run_service_pb2 as pb

CREATED = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def specified(enum_type: object) -> set[int]:
    """The values of a proto enum other than its *_UNSPECIFIED zero."""
    return {
        number
        for name, number in enum_type.items()  # type: ignore[attr-defined]
        if not name.endswith("_UNSPECIFIED")
    }


def unknown(enum_type: object) -> int:
    return max(enum_type.values()) + 1  # type: ignore[attr-defined]


def fields(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


# --- the enum tables are total ------------------------------------------------------


def test_every_run_state_has_a_proto_value() -> None:
    assert set(convert.RUN_STATES) == set(RunState)
    assert set(convert.RUN_STATES.values()) == specified(pb.RunState)
    assert len(set(convert.RUN_STATES.values())) == len(RunState)


@pytest.mark.parametrize("state", list(RunState))
def test_run_state_names_match(state: RunState) -> None:
    assert pb.RunState.Name(convert.RUN_STATES[state]) == f"RUN_STATE_{state.value}"
    assert convert.RUN_STATES_FROM_PROTO[convert.RUN_STATES[state]] is state


def test_every_job_state_has_a_proto_value() -> None:
    assert set(convert.JOB_STATES) == set(JobState)
    assert set(convert.JOB_STATES.values()) == specified(pb.JobState)
    for state, value in convert.JOB_STATES.items():
        assert pb.JobState.Name(value) == f"JOB_STATE_{state.value}"


def test_job_outcomes_cover_the_proto_enum() -> None:
    assert set(convert.JOB_OUTCOMES) == specified(pb.JobOutcome)
    assert set(convert.JOB_OUTCOMES.values()) == set(JobOutcome)
    for value, outcome in convert.JOB_OUTCOMES.items():
        assert pb.JobOutcome.Name(value) == f"JOB_OUTCOME_{outcome.value}"


def test_run_outcomes_cover_the_proto_enum() -> None:
    assert set(convert.RUN_OUTCOMES) == specified(pb.RunOutcome)
    assert set(convert.RUN_OUTCOMES.values()) == set(RunOutcome)
    for value, outcome in convert.RUN_OUTCOMES.items():
        assert pb.RunOutcome.Name(value) == f"RUN_OUTCOME_{outcome.value}"


# --- unspecified and unknown values are refused -------------------------------------


@pytest.mark.parametrize("value", [pb.RUN_OUTCOME_UNSPECIFIED, unknown(pb.RunOutcome)])
def test_run_outcome_refuses_unspecified_and_unknown(value: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        convert.run_outcome(value)
    assert fields(raised.value) == ["outcome"]


@pytest.mark.parametrize("value", sorted(specified(pb.RunOutcome)))
def test_run_outcome_accepts_every_specified_value(value: int) -> None:
    assert convert.run_outcome(value) is convert.RUN_OUTCOMES[value]


def test_job_results_refuse_unspecified_and_unknown_outcomes_at_once() -> None:
    messages = [
        pb.JobResult(job_id="a", outcome=pb.JOB_OUTCOME_COMPLETED),
        pb.JobResult(job_id="b", outcome=pb.JOB_OUTCOME_UNSPECIFIED),
        pb.JobResult(job_id="c", outcome=pb.JOB_OUTCOME_FAILED, error="x"),
        pb.JobResult(job_id="d", outcome=unknown(pb.JobOutcome)),  # type: ignore[arg-type]
    ]
    with pytest.raises(InvalidArgument) as raised:
        convert.job_results(messages)
    assert fields(raised.value) == ["results[1].outcome", "results[3].outcome"]


def test_job_results_convert_valid_messages() -> None:
    results = convert.job_results(
        [
            pb.JobResult(job_id="a", outcome=pb.JOB_OUTCOME_COMPLETED),
            pb.JobResult(job_id="b", outcome=pb.JOB_OUTCOME_FAILED, error="busy"),
        ]
    )
    assert [(r.job_id, r.outcome, r.error) for r in results] == [
        ("a", JobOutcome.COMPLETED, None),
        ("b", JobOutcome.FAILED, "busy"),
    ]


def test_run_states_refuse_unspecified_and_unknown_values() -> None:
    values = [pb.RUN_STATE_PENDING, pb.RUN_STATE_UNSPECIFIED, unknown(pb.RunState)]
    with pytest.raises(InvalidArgument) as raised:
        convert.run_states(values)
    assert fields(raised.value) == ["states[1]", "states[2]"]


def test_run_states_convert_every_specified_value() -> None:
    values = sorted(specified(pb.RunState))
    assert convert.run_states(values) == [convert.RUN_STATES_FROM_PROTO[v] for v in values]
    assert convert.run_states([]) == []


# --- messages --------------------------------------------------------------------------


def test_run_to_proto_round_trips_times_and_counts() -> None:
    run = Run(
        id="7d1f5b8e-0000-4000-8000-000000000001",
        tenant_id="t1",
        state=RunState.RUNNING,
        request_id="req-1",
        lease_epoch=3,
        cancel_requested=True,
        create_time=CREATED,
        stop_reason=None,
        cancel_reason="user asked",
        cancel_request_time=CREATED + timedelta(seconds=9),
        worker_id="w1",
        start_time=CREATED + timedelta(seconds=1),
        end_time=None,
        last_heartbeat_time=CREATED + timedelta(seconds=5, microseconds=250),
        job_counts=JobCounts(total=10, queued=4, in_progress=3, completed=2, failed=1),
        number=2**40 + 7,
    )
    message = convert.run_to_proto(run)
    assert message.id == run.id
    assert message.number == 2**40 + 7  # int64, beyond 32 bits
    assert message.tenant_id == "t1"
    assert message.state == pb.RUN_STATE_RUNNING
    assert message.request_id == "req-1"
    assert message.lease_epoch == 3
    assert message.cancel_requested is True
    assert message.cancel_reason == "user asked"
    assert message.worker_id == "w1"
    assert message.stop_reason == ""
    for name in ("create_time", "start_time", "last_heartbeat_time", "cancel_request_time"):
        assert message.HasField(name)
        back = getattr(message, name).ToDatetime(tzinfo=UTC)
        assert back == getattr(run, name)
        assert back.utcoffset() == timedelta(0)
    assert not message.HasField("end_time")
    counts = message.job_counts
    assert (counts.total, counts.queued, counts.in_progress, counts.completed, counts.failed) == (
        10,
        4,
        3,
        2,
        1,
    )


def test_run_to_proto_of_an_ended_run() -> None:
    run = Run(
        id="r",
        tenant_id="t1",
        state=RunState.STOPPED,
        request_id="req",
        lease_epoch=1,
        cancel_requested=False,
        create_time=CREATED,
        stop_reason="HEARTBEAT_TIMEOUT",
        end_time=CREATED + timedelta(minutes=2),
    )
    message = convert.run_to_proto(run)
    assert message.state == pb.RUN_STATE_STOPPED
    assert message.stop_reason == "HEARTBEAT_TIMEOUT"
    assert message.worker_id == ""
    assert message.end_time.ToDatetime(tzinfo=UTC) == CREATED + timedelta(minutes=2)
    assert not message.HasField("start_time")
    assert not message.HasField("cancel_request_time")
    assert message.job_counts.total == 0


def test_timestamp_of_a_non_utc_time_is_the_same_instant() -> None:
    local = CREATED.astimezone(timezone(timedelta(hours=3)))
    stamp = convert.timestamp(local)
    assert stamp is not None
    assert stamp.ToDatetime(tzinfo=UTC) == CREATED
    assert convert.timestamp(None) is None


def test_job_to_proto() -> None:
    job = Job(
        id="j1",
        run_id="r1",
        external_id="call-1",
        payload=b"\x00\x01payload",
        state=JobState.FAILED,
        error="no answer",
        late=True,
    )
    message = convert.job_to_proto(job)
    assert (message.id, message.run_id, message.external_id) == ("j1", "r1", "call-1")
    assert message.payload == b"\x00\x01payload"
    assert message.state == pb.JOB_STATE_FAILED
    assert message.error == "no answer"
    assert message.late is True


def test_job_specs() -> None:
    specs = convert.job_specs([pb.JobSpec(external_id="a", payload=b"1"), pb.JobSpec()])
    assert [(s.external_id, s.payload) for s in specs] == [("a", b"1"), ("", b"")]
