"""Who may call what: bearer tokens, the table of roles per RPC, and the caller's tenant.

Deny by default: an RPC of ours that is missing from :data:`RPC_ROLES` is
refused for everyone (a unit test walks the service descriptor so that a new
RPC cannot ship without an entry). Only the health and reflection services
are open.

Every call of ours passes, in this order (AIP-211: authorization before
validation): authentication (a bearer token, or a worker's client
certificate), the tenant's rate limit for the RPC's class (before the role
check, whose refusal is audited: a flood is refused before any audit work),
the role table, the deadline cap, and only then the decoding of the request bytes, so that
an unauthenticated caller never reaches the protobuf parser and a message
that does not parse is INVALID_ARGUMENT, not INTERNAL.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from runsvc import logs, tokens
from runsvc.api.status import to_status
from runsvc.errors import FieldViolation, InvalidArgument, PermissionDenied, RateLimited
from runsvc.ratelimit import RateLimiter
from runsvc.service.context import Caller
from runsvc.service.security import SecurityAudit
from runsvc.tokens import Principal

SERVICE = "runsvc.v1.RunService"
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_BACKEND = frozenset({"backend", "admin"})
_WORKER = frozenset({"worker"})

RPC_ROLES: dict[str, frozenset[str]] = {
    "CreateRun": _BACKEND,
    "GetActive": _BACKEND,
    "GetRun": _BACKEND,
    "ListRuns": _BACKEND,
    "Cancel": _BACKEND,
    "ForceCancel": _BACKEND,
    "ClaimRun": _WORKER,
    "Heartbeat": _WORKER,
    "AcquireJobs": _WORKER,
    "ReportJobs": _WORKER,
    "FinishRun": _WORKER,
}

# Each RPC's rate-limit class (runsvc.ratelimit): heartbeats have a budget of their own.
RPC_RATE_CLASSES: dict[str, str] = {
    "CreateRun": "write",
    "GetActive": "read",
    "GetRun": "read",
    "ListRuns": "read",
    "Cancel": "write",
    "ForceCancel": "write",
    "ClaimRun": "worker",
    "Heartbeat": "heartbeat",
    "AcquireJobs": "worker",
    "ReportJobs": "worker",
    "FinishRun": "worker",
}

# The only thing an unauthenticated caller learns.
UNAUTHENTICATED_MESSAGE = "authentication required"
# A client certificate stands for a worker token when its subject has this OU.
WORKER_CERTIFICATE_UNIT = "worker"

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("runsvc_principal")


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served on this thread."""
    return _principal.get()


def tenant_scope(principal: Principal, requested: str) -> str | None:
    """The tenant a call acts for: the token's; an admin may name one (or none: all)."""
    if principal.role == "admin":
        if requested and (len(requested) > tokens.MAX_TENANT_LENGTH or not requested.isprintable()):
            raise InvalidArgument([FieldViolation("tenant_id", "is not a valid tenant id")])
        return requested or None
    if requested and requested != principal.tenant_id:
        raise PermissionDenied("the token may not act for another tenant")
    return principal.tenant_id


def required_tenant(principal: Principal, requested: str) -> str:
    tenant = tenant_scope(principal, requested)
    if tenant is None:
        raise InvalidArgument([FieldViolation("tenant_id", "an admin must name the tenant")])
    return tenant


def certificate_principal(context: grpc.ServicerContext) -> Principal | None:
    """The worker a verified client certificate names, if it names one.

    gRPC puts the peer's certificate in the auth context only after verifying
    it against ``RUNSVC_TLS_CLIENT_CA_FILE``. The certificate stands for a
    worker token when its subject has ``OU=worker``: ``CN`` is the worker's
    identity and ``O``, when present, its tenant (absent: fleet-wide).
    """
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    try:
        subject = x509.load_pem_x509_certificate(pems[0]).subject
    except ValueError:
        return None

    def attribute(oid: x509.ObjectIdentifier) -> str | None:
        values = subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else None

    name = attribute(NameOID.COMMON_NAME)
    if attribute(NameOID.ORGANIZATIONAL_UNIT_NAME) != WORKER_CERTIFICATE_UNIT or not name:
        return None
    return Principal(subject=name, role="worker", tenant_id=attribute(NameOID.ORGANIZATION_NAME))


def caller_of(principal: Principal) -> Caller:
    """The use cases' view of the caller; a worker is bound to its identity."""
    worker = principal.subject if principal.role == "worker" else None
    return Caller(subject=principal.subject, role=principal.role, worker=worker)


def undecodable(field: str) -> grpc.Status:
    return to_status(InvalidArgument([FieldViolation(field, "is not a valid message")]))


def _ignore(_kind: str) -> None:
    pass


class Gate:
    """Admits a call of ours: authentication, rate limit, role (see the module docstring).

    ``on_denied("unauthenticated" | "role")`` hears of each refusal. The edge
    (runsvc.api.edge) asks it once per call, before the request is decoded.
    """

    def __init__(
        self,
        verifier: tokens.Verifier | str,
        *,
        audit: SecurityAudit | None = None,
        limiter: RateLimiter | None = None,
        max_deadline_seconds: float | None = None,
        on_denied: Callable[[str], None] = _ignore,
    ) -> None:
        if isinstance(verifier, str):
            verifier = tokens.Verifier(secret=verifier)
        self._verifier = verifier
        self._on_denied = on_denied
        self._audit = audit
        self._limiter = limiter
        self._max_deadline = max_deadline_seconds

    def admit(
        self,
        token: str | None,
        method: str,
        allowed: frozenset[str] | None,
        rate_class: str,
        context: grpc.ServicerContext,
    ) -> Principal:
        """The caller, once authenticated, within its rate and allowed ``method``; else the
        call is aborted with the refusal."""
        principal = self._authenticate(token, context)
        # The rate limit comes before the role check: a refusal costs an audit
        # count, so a caller past its budget must not reach one.
        self._throttle(principal, rate_class, context)
        if allowed is None or principal.role not in allowed:
            self._deny_role(principal, method, context)
        return principal

    def deadline(self, context: grpc.ServicerContext) -> float | None:
        """When this call's work must be over: the client's deadline, capped."""
        remaining = context.time_remaining()
        if self._max_deadline is not None and (remaining is None or remaining > self._max_deadline):
            remaining = self._max_deadline
        return None if remaining is None else time.monotonic() + remaining

    def _authenticate(self, token: str | None, context: grpc.ServicerContext) -> Principal:
        try:
            if token is not None:
                return self._verifier.verify(token)
            principal = certificate_principal(context)
            if principal is not None:
                return principal
            raise tokens.Unauthenticated()
        except tokens.Unauthenticated:
            self._on_denied("unauthenticated")
            if self._audit is not None:
                self._audit.count("TOKEN_REFUSED", tenant_id=None, sample=context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            raise  # pragma: no cover - abort raises

    def _deny_role(self, principal: Principal, method: str, context: grpc.ServicerContext) -> None:
        self._on_denied("role")
        if self._audit is not None:
            self._audit.denied(
                action="ROLE_DENIED",
                caller=caller_of(principal),
                tenant_id=principal.tenant_id,
                method=method,
            )
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "the caller may not do this")

    def _throttle(self, principal: Principal, rate_class: str, context: Any) -> None:
        if self._limiter is None:
            return
        key = principal.tenant_id or f"{principal.role}:{principal.subject}"
        try:
            self._limiter.take(rate_class, key)
        except RateLimited as limited:
            if self._audit is not None:
                self._audit.count(
                    f"RATE_LIMITED_{rate_class.upper()}",
                    tenant_id=principal.tenant_id,
                    sample=principal.subject,
                )
            context.abort_with_status(to_status(limited))


@contextmanager
def bind_principal(principal: Principal) -> Iterator[None]:
    """``principal`` is the caller (and its tenant a log field) inside the block."""
    token = _principal.set(principal)
    try:
        with logs.bound(tenant=principal.tenant_id):
            yield
    finally:
        _principal.reset(token)
