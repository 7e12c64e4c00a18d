"""gRPC errors from runsvc, as one exception class per status code.

Every call of this package raises one of these, ``from`` the original
``grpc.RpcError``::

    RunsvcError                 any refusal; .code, .reason, .metadata, .message
    ├── Cancelled               CANCELLED
    ├── Unknown                 UNKNOWN
    ├── InvalidArgument         INVALID_ARGUMENT; .field_violations
    ├── DeadlineExceeded        DEADLINE_EXCEEDED
    ├── NotFound                NOT_FOUND (GetActive: the tenant has no active run)
    ├── AlreadyExists           ALREADY_EXISTS; .run_id of the active run
    ├── PermissionDenied        PERMISSION_DENIED (wrong role, or not this tenant's run)
    ├── ResourceExhausted       RESOURCE_EXHAUSTED
    ├── FailedPrecondition      FAILED_PRECONDITION
    │   └── LeaseLost           ... with reason LEASE_LOST: stop working on the run now
    ├── Aborted                 ABORTED
    ├── OutOfRange              OUT_OF_RANGE
    ├── Unimplemented           UNIMPLEMENTED
    ├── Internal                INTERNAL
    ├── Unavailable             UNAVAILABLE
    ├── DataLoss                DATA_LOSS
    └── Unauthenticated         UNAUTHENTICATED

The reason comes from the ``google.rpc.ErrorInfo`` (domain ``runsvc.v1``) in
the ``grpc-status-details-bin`` trailer; it is empty when the server sent none
(for example UNAUTHENTICATED, or a status made by the transport itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "runsvc.v1"
LEASE_LOST = "LEASE_LOST"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class RunsvcError(Exception):
    """runsvc refused the call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = tuple(field_violations)

    @property
    def message(self) -> str:
        return str(self.args[0])

    def __str__(self) -> str:
        prefix = f"{self.code.name}"
        if self.reason and self.reason != self.code.name:
            prefix += f" ({self.reason})"
        return f"{prefix}: {self.message}"


class Cancelled(RunsvcError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unknown(RunsvcError):
    """The call failed for an unknown reason."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(RunsvcError):
    """The request is not valid; nothing changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RunsvcError):
    """No answer before the deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(RunsvcError):
    """Not found."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RunsvcError):
    """The tenant already has an active run."""

    code = grpc.StatusCode.ALREADY_EXISTS

    @property
    def run_id(self) -> str:
        """The id of the run that is already active ("" when the server did not say)."""
        return self.metadata.get("run_id", "")


class PermissionDenied(RunsvcError):
    """The caller may not do this, or the run is not the caller's tenant's."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RunsvcError):
    """A limit was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RunsvcError):
    """The run is not in a state that allows this."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LeaseLost(FailedPrecondition):
    """The lease on the run is no longer held; stop working on it."""


class Aborted(RunsvcError):
    """The call was aborted."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(RunsvcError):
    """A value is out of range."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(RunsvcError):
    """The server does not implement this call."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(RunsvcError):
    """The server failed."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(RunsvcError):
    """The service (or its database) cannot be reached; try again."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(RunsvcError):
    """Data was lost."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(RunsvcError):
    """No valid token."""

    code = grpc.StatusCode.UNAUTHENTICATED


ERRORS_BY_CODE: dict[grpc.StatusCode, type[RunsvcError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def _details(
    error: grpc.RpcError,
) -> tuple[str, dict[str, str], list[FieldViolation]]:
    """The ErrorInfo reason and metadata and the field violations, when the server sent them."""
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    if not isinstance(error, grpc.Call):
        return reason, metadata, violations
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # The trailer does not match the call's code or message: ignore it.
        return reason, metadata, violations
    if status is None:
        return reason, metadata, violations
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return reason, metadata, violations


def from_rpc_error(error: grpc.RpcError) -> RunsvcError:
    """The exception for a failed call; raise it ``from error``."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (error.details() if isinstance(error, grpc.Call) else None) or None
    reason, metadata, violations = _details(error)
    cls = ERRORS_BY_CODE.get(code, Unknown)
    if cls is FailedPrecondition and reason == LEASE_LOST:
        cls = LeaseLost
    return cls(message, reason=reason, metadata=metadata, field_violations=violations)
