"""Who may call what: bearer tokens, the table of roles per RPC, and the caller's tenant.

Deny by default: an RPC of ours that is missing from :data:`RPC_ROLES` is
refused for everyone (a unit test walks the service descriptor so that a new
RPC cannot ship without an entry). Only the health and reflection services
are open.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

import grpc

from runsvc import tokens
from runsvc.api.token_cache import VerifiedTokens
from runsvc.errors import FieldViolation, InvalidArgument, PermissionDenied
from runsvc.tokens import Principal

log = logging.getLogger("runsvc.audit")

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

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("runsvc_principal")


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served on this thread."""
    return _principal.get()


def tenant_scope(principal: Principal, requested: str) -> str | None:
    """The tenant a call acts for: the token's; an admin may name one (or none: all)."""
    if principal.role == "admin":
        return requested or None
    if requested and requested != principal.tenant_id:
        raise PermissionDenied("the token may not act for another tenant")
    return principal.tenant_id


def required_tenant(principal: Principal, requested: str) -> str:
    tenant = tenant_scope(principal, requested)
    if tenant is None:
        raise InvalidArgument([FieldViolation("tenant_id", "an admin must name the tenant")])
    return tenant


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._tokens = VerifiedTokens(secret)

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        handler = continuation(details)
        if service in OPEN_SERVICES or handler is None:
            return handler
        allowed = RPC_ROLES.get(method) if service == SERVICE else None
        token = _bearer(details.invocation_metadata)
        inner = handler.unary_unary

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if token is None:
                    raise tokens.Unauthenticated("missing bearer token")
                principal = self._tokens.verify(token)
            except tokens.Unauthenticated as refused:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, refused.message)
                raise  # pragma: no cover - abort raises
            if allowed is None or principal.role not in allowed:
                log.warning(
                    "role may not call this method",
                    extra={
                        "audit": {
                            "tag": "SECURITY",
                            "method": details.method,
                            "caller": principal.subject,
                            "role": principal.role,
                            "tenant_id": principal.tenant_id,
                        }
                    },
                )
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "the caller may not do this")
            reset = _principal.set(principal)
            try:
                return inner(request, context)
            finally:
                _principal.reset(reset)

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
