"""The one error tree of runsvc.

Raised by the domain, the store and the service; translated to gRPC status
codes in exactly one place (``runsvc.api.errors``)::

    RunsvcError
    ├── InvalidArgument          bad input; carries field violations
    ├── Unauthenticated          no token, or a token that does not verify
    ├── PermissionDenied         wrong role, or a tenant the caller may not act for
    │   └── RunNotVisible        no such run for this caller (missing or another tenant's)
    ├── NoActiveRun              the tenant has no pending or running run
    ├── ActiveRunExists          the tenant already has an active run
    ├── FailedPrecondition
    │   ├── LeaseLost            the caller's lease is no longer current: stop now
    │   └── InvalidTransition    the run's state does not allow this
    ├── Unavailable              the store cannot be reached
    └── RateLimited              the caller's tenant spent its budget for this kind of call

Each class's docstring is its default message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class RunsvcError(Exception):
    """runsvc failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


# An error reply lists this many violations at most, and the total: a request
# with 100,000 bad items must not be answered with megabytes, nor with trailers
# larger than a client accepts (it would see RESOURCE_EXHAUSTED, not the error).
MAX_VIOLATIONS = 10


class InvalidArgument(RunsvcError):
    """The request is not valid."""

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        super().__init__(message)
        self.total = len(violations)
        self.violations = tuple(violations[:MAX_VIOLATIONS])


class Unauthenticated(RunsvcError):
    """Authentication required."""


class PermissionDenied(RunsvcError):
    """The caller may not do this."""


class RunNotVisible(PermissionDenied):
    """The run does not exist or the caller may not access it."""

    def __init__(self, *, run_id: str, tenant_id: str | None) -> None:
        super().__init__()
        self.run_id = run_id
        self.tenant_id = tenant_id


class NoActiveRun(RunsvcError):
    """The tenant has no active run."""


class ActiveRunExists(RunsvcError):
    """The tenant already has an active run."""

    def __init__(self, run_id: str, message: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class FailedPrecondition(RunsvcError):
    """The run is not in a state that allows this."""

    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str | None = None, *, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.metadata = dict(metadata or {})


class LeaseLost(FailedPrecondition):
    """The lease on this run is no longer held by the caller; stop working on it."""

    reason = "LEASE_LOST"


class InvalidTransition(FailedPrecondition):
    """The run's state does not allow this."""

    reason = "INVALID_TRANSITION"


class Unavailable(RunsvcError):
    """The store is unavailable; try again."""


class RateLimited(RunsvcError):
    """Too many requests; retry later."""

    def __init__(self, *, retry_after_seconds: float, rate_class: str) -> None:
        super().__init__()
        self.retry_after_seconds = retry_after_seconds
        self.rate_class = rate_class
