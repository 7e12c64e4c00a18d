"""Domain errors → gRPC status: the table is total and the rich details decode."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

import runsvc.api.servicer
import runsvc.reaper
import runsvc.service
import runsvc.service.backend
import runsvc.service.worker  # defines FailedPrecondition subclasses of its own
import runsvc.store.jobs
import runsvc.store.runs
from runsvc import errors
from runsvc.api.status import ERROR_DOMAIN, STATUS_CODES, to_status
from runsvc.errors import FieldViolation
from runsvc.service.worker import JobNotHeld, JobsUnfinished

DETAILS_KEY = "grpc-status-details-bin"

# Importing them is what registers their error classes; keep the imports used.
_DEFINING_MODULES = (
    runsvc.api.servicer,
    runsvc.reaper,
    runsvc.service,
    runsvc.service.backend,
    runsvc.service.worker,
    runsvc.store.jobs,
    runsvc.store.runs,
)


def all_subclasses(cls: type[errors.RunsvcError]) -> set[type[errors.RunsvcError]]:
    found: set[type[errors.RunsvcError]] = set()
    stack = [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


def make(cls: type[errors.RunsvcError]) -> errors.RunsvcError:
    """An instance of any error class, whatever its constructor."""
    if issubclass(cls, errors.InvalidArgument):
        return cls([FieldViolation("field", "is wrong")])  # type: ignore[call-arg]
    if issubclass(cls, errors.RunNotVisible):
        return cls(run_id="run-1", tenant_id="t1")  # type: ignore[call-arg]
    if issubclass(cls, errors.ActiveRunExists):
        return cls("run-1")  # type: ignore[call-arg]
    if issubclass(cls, errors.RateLimited):
        return cls(retry_after_seconds=0.25, rate_class="read")  # type: ignore[call-arg]
    return cls()


def decode(status: grpc.Status) -> status_pb2.Status:
    blobs = [value for key, value in status.trailing_metadata if key == DETAILS_KEY]
    assert len(blobs) == 1
    return status_pb2.Status.FromString(blobs[0])


def error_info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    infos = []
    for detail in decode(status).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1
    return infos[0]


def bad_request(status: grpc.Status) -> error_details_pb2.BadRequest | None:
    for detail in decode(status).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            return request
    return None


SUBCLASSES = sorted(all_subclasses(errors.RunsvcError), key=lambda c: c.__qualname__)

EXPECTED_CODES: dict[type[errors.RunsvcError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.RunNotVisible: grpc.StatusCode.PERMISSION_DENIED,
    errors.NoActiveRun: grpc.StatusCode.NOT_FOUND,
    errors.ActiveRunExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LeaseLost: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidTransition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    JobsUnfinished: grpc.StatusCode.FAILED_PRECONDITION,
    JobNotHeld: grpc.StatusCode.FAILED_PRECONDITION,
}


def test_the_walk_finds_the_known_errors() -> None:
    assert set(EXPECTED_CODES) <= set(SUBCLASSES)


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__qualname__)
def test_every_subclass_maps_to_a_code_other_than_internal(
    cls: type[errors.RunsvcError],
) -> None:
    status = to_status(make(cls))
    assert status.code is not grpc.StatusCode.INTERNAL
    assert decode(status).code == getattr(code_pb2, status.code.name)
    info = error_info(status)
    assert info.domain == ERROR_DOMAIN
    assert info.reason and info.reason != "INTERNAL"


@pytest.mark.parametrize("cls", list(EXPECTED_CODES), ids=lambda c: c.__qualname__)
def test_expected_codes(cls: type[errors.RunsvcError]) -> None:
    assert to_status(make(cls)).code is EXPECTED_CODES[cls]


def test_the_base_error_is_internal() -> None:
    status = to_status(errors.RunsvcError("boom"))
    assert status.code is grpc.StatusCode.INTERNAL
    assert STATUS_CODES[errors.RunsvcError] is grpc.StatusCode.INTERNAL
    assert error_info(status).reason == "INTERNAL"


def test_lease_lost_is_failed_precondition_with_reason_lease_lost() -> None:
    status = to_status(errors.LeaseLost(metadata={"lease_epoch": "3"}))
    assert status.code is grpc.StatusCode.FAILED_PRECONDITION
    decoded = decode(status)
    assert decoded.code == code_pb2.FAILED_PRECONDITION
    assert decoded.message == errors.LeaseLost().message
    assert status.details == decoded.message
    info = error_info(status)
    assert info.reason == "LEASE_LOST"
    assert info.domain == "runsvc.v1"
    assert dict(info.metadata) == {"lease_epoch": "3"}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (errors.InvalidTransition(), "INVALID_TRANSITION"),
        (errors.FailedPrecondition(), "FAILED_PRECONDITION"),
        (JobsUnfinished(), "JOBS_UNFINISHED"),
        (JobNotHeld(), "JOB_NOT_HELD"),
        (errors.NoActiveRun(), "NO_ACTIVE_RUN"),
        (errors.Unauthenticated(), "UNAUTHENTICATED"),
        (errors.PermissionDenied(), "PERMISSION_DENIED"),
        (errors.Unavailable(), "UNAVAILABLE"),
    ],
)
def test_reasons(error: errors.RunsvcError, reason: str) -> None:
    assert error_info(to_status(error)).reason == reason


def test_active_run_exists_names_the_run() -> None:
    status = to_status(errors.ActiveRunExists("run-42"))
    assert status.code is grpc.StatusCode.ALREADY_EXISTS
    info = error_info(status)
    assert info.reason == "ACTIVE_RUN_EXISTS"
    assert dict(info.metadata) == {"run_id": "run-42"}


def test_invalid_argument_carries_field_violations() -> None:
    error = errors.InvalidArgument(
        [
            FieldViolation("jobs[0].external_id", "must not be empty"),
            FieldViolation("request_id", "must be at most 128 characters"),
        ]
    )
    status = to_status(error)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(status).reason == "INVALID_ARGUMENT"
    request = bad_request(status)
    assert request is not None
    assert [(v.field, v.description) for v in request.field_violations] == [
        ("jobs[0].external_id", "must not be empty"),
        ("request_id", "must be at most 128 characters"),
    ]
    assert "jobs[0].external_id: must not be empty" in status.details
    assert "request_id: must be at most 128 characters" in status.details


def test_only_invalid_argument_carries_bad_request() -> None:
    assert bad_request(to_status(errors.LeaseLost())) is None
    assert bad_request(to_status(errors.NoActiveRun())) is None


def test_run_not_visible_does_not_reveal_the_run() -> None:
    first = to_status(errors.RunNotVisible(run_id="run-aaa", tenant_id="t1"))
    second = to_status(errors.RunNotVisible(run_id="run-bbb", tenant_id="t2"))
    assert first.code is second.code is grpc.StatusCode.PERMISSION_DENIED
    assert first.details == second.details
    assert first.trailing_metadata == second.trailing_metadata
    assert decode(first).SerializeToString() == decode(second).SerializeToString()
    for status in (first, second):
        blob = dict(status.trailing_metadata)[DETAILS_KEY]
        assert b"run-aaa" not in blob and b"run-bbb" not in blob
        assert "run-" not in status.details


def test_rate_limited_carries_retry_info() -> None:
    status = to_status(errors.RateLimited(retry_after_seconds=1.5, rate_class="read"))
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(status)
    assert (info.reason, dict(info.metadata)) == ("RATE_LIMITED", {"rate_class": "read"})
    retry = [d for d in decode(status).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retry) == 1
    unpacked = error_details_pb2.RetryInfo()
    retry[0].Unpack(unpacked)
    assert unpacked.retry_delay.ToNanoseconds() == 1_500_000_000
