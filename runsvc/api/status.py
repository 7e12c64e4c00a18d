"""Domain errors → gRPC status with rich details (AIP-193), in one table.

Every error carries an ``ErrorInfo`` (domain ``runsvc.v1``) whose reason a
client can switch on; bad input also carries ``BadRequest`` field violations.
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from runsvc import errors

V = TypeVar("V")

ERROR_DOMAIN = "runsvc.v1"

# Most specific first: the first class in an error's MRO found here wins.
STATUS_CODES: dict[type[errors.RunsvcError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NoActiveRun: grpc.StatusCode.NOT_FOUND,
    errors.ActiveRunExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RunsvcError: grpc.StatusCode.INTERNAL,
}

REASONS: dict[type[errors.RunsvcError], str] = {
    errors.InvalidArgument: "INVALID_ARGUMENT",
    errors.Unauthenticated: "UNAUTHENTICATED",
    errors.PermissionDenied: "PERMISSION_DENIED",
    errors.NoActiveRun: "NO_ACTIVE_RUN",
    errors.ActiveRunExists: "ACTIVE_RUN_EXISTS",
    errors.Unavailable: "UNAVAILABLE",
    errors.RateLimited: "RATE_LIMITED",
    errors.RunsvcError: "INTERNAL",
}


def _lookup(table: dict[type[errors.RunsvcError], V], error: errors.RunsvcError) -> V:
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    raise KeyError(type(error))  # pragma: no cover - RunsvcError is always in the tables


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: errors.RunsvcError) -> grpc.Status:
    code = _lookup(STATUS_CODES, error)
    metadata: dict[str, str] = {}
    if isinstance(error, errors.FailedPrecondition):
        reason, metadata = error.reason, error.metadata
    else:
        reason = _lookup(REASONS, error)
    if isinstance(error, errors.ActiveRunExists) and error.run_id:
        metadata = {"run_id": error.run_id}
    if isinstance(error, errors.InvalidArgument):
        metadata = {"violations": str(error.total)}
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    ]
    if isinstance(error, errors.RateLimited):
        metadata = {"rate_class": error.rate_class}
        details[0] = _pack(
            error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, int(error.retry_after_seconds * 1e9)))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    message = error.message
    if isinstance(error, errors.InvalidArgument) and error.violations:
        message += " " + "; ".join(f"{v.field}: {v.description}" for v in error.violations)
        if error.total > len(error.violations):
            message += f" (and {error.total - len(error.violations)} more; {error.total} in all)"
    return rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    )
