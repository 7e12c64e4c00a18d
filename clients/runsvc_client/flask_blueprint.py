"""A Flask blueprint serving the UI's outbound-call endpoints from runsvc.

    from runsvc_client.flask_blueprint import outbound_calls_blueprint

    app.register_blueprint(
        outbound_calls_blueprint(
            "runsvc:50051",
            tenant=lambda: g.business_id,          # the business of this request
            token=tokens.backend_token_for,        # a backend token for a business
        )
    )

Endpoints (JSON bodies):

* ``GET  /api/outbound_calls/jobs/active``: 200 ``{"run": {...}}``, or 404
  ``{"error": ...}`` when the business has no active queue;
* ``POST /api/outbound_calls/jobs/<id>/cancel``: 200 ``{"run": {...}}``;
* ``POST /api/outbound_calls/jobs/<id>/force-cancel``: 200 ``{"run": {...},
  "cancelled_count": n, "released_slots": m}``.

An optional JSON body ``{"reason": "..."}`` gives the cancel's reason. A run
of another business is 403. Errors carry ``error``, ``code`` (the gRPC status)
and ``reason`` (the ErrorInfo reason).

Needs the ``flask`` extra: ``pip install 'runsvc-client[flask]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import flask
import grpc

from runsvc_client.backend import DEFAULT_TIMEOUT, BackendClient
from runsvc_client.balancing import Target, balanced_channel
from runsvc_client.errors import RunsvcError

log = logging.getLogger("runsvc_client.flask")

# gRPC status -> HTTP status for the UI. UNAUTHENTICATED is the host app's
# service token being refused, not the UI user's fault: a bad gateway.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 502,
}

NO_ACTIVE_QUEUE = "no active outbound queue"
NO_ACCESS = "no access to this queue"

Reply = tuple[flask.Response, int]


def _reply(body: dict[str, Any], status: int = 200) -> Reply:
    return flask.jsonify(body), status


def _error_reply(error: RunsvcError, *, tenant: str, run_id: str | None) -> Reply:
    status = HTTP_STATUS.get(error.code, 500)
    message = error.message
    if status == 403 and run_id is not None:
        # The seed's audit tag: a business reached for a run that is not its own.
        log.warning(
            "[SECURITY] access to another business's run refused",
            extra={"tenant_id": tenant, "run_id": run_id},
        )
        message = NO_ACCESS
    return _reply({"error": message, "code": error.code.name, "reason": error.reason}, status)


def _reason() -> str:
    body = flask.request.get_json(silent=True)
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        return str(body["reason"])
    return ""


def outbound_calls_blueprint(
    target: Target | grpc.Channel,
    *,
    tenant: Callable[[], str],
    token: Callable[[str], str],
    timeout: float = DEFAULT_TIMEOUT,
    name: str = "runsvc_outbound_calls",
    url_prefix: str = "/api/outbound_calls",
) -> flask.Blueprint:
    """The blueprint; ``tenant()`` names the request's business, ``token(tenant)`` signs for it.

    A target or a list of addresses opens one balanced channel shared by every request.
    """
    channel = target if isinstance(target, grpc.Channel) else balanced_channel(target)
    blueprint = flask.Blueprint(name, __name__, url_prefix=url_prefix)

    def client_for(business: str) -> BackendClient:
        return BackendClient(channel, token=token(business), timeout=timeout)

    def call(run_id: str | None, action: Callable[[BackendClient], Reply]) -> Reply:
        business = tenant()
        try:
            return action(client_for(business))
        except RunsvcError as error:
            return _error_reply(error, tenant=business, run_id=run_id)

    @blueprint.get("/jobs/active")
    def active() -> Reply:
        def action(client: BackendClient) -> Reply:
            run = client.get_active()
            if run is None:
                return _reply({"error": NO_ACTIVE_QUEUE}, 404)
            return _reply({"run": run.to_json()})

        return call(None, action)

    @blueprint.post("/jobs/<run_id>/cancel")
    def cancel(run_id: str) -> Reply:
        reason = _reason()
        return call(run_id, lambda c: _reply({"run": c.cancel(run_id, reason=reason).to_json()}))

    @blueprint.post("/jobs/<run_id>/force-cancel")
    def force_cancel(run_id: str) -> Reply:
        reason = _reason()

        def action(client: BackendClient) -> Reply:
            done = client.force_cancel(run_id, reason=reason)
            log.info(
                "[FORCE_CANCEL] run force-cancelled",
                extra={"run_id": run_id, "cancelled_count": done.cancelled_jobs},
            )
            return _reply(
                {
                    "run": done.run.to_json(),
                    "cancelled_count": done.cancelled_jobs,
                    "released_slots": done.released_slots,
                }
            )

        return call(run_id, action)

    return blueprint
