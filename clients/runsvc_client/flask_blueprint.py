"""A Flask blueprint serving the monolith UI's outbound-call endpoints from runsvc.

    from runsvc_client.flask_blueprint import outbound_calls_blueprint

    app.register_blueprint(
        outbound_calls_blueprint(
            "runsvc:50051",
            tenant=lambda: g.business_id,          # the business of this session
            token=tokens.backend_token_for,        # a token that may act for it
        )
    )

Endpoints, where ``<id>`` is the run's number (or its UUID):

* ``GET  /api/outbound_calls/jobs/active``: 200 the run, or 404 when the
  business has no active queue;
* ``GET  /api/outbound_calls/jobs/<id>``: 200 the run;
* ``POST /api/outbound_calls/jobs/<id>/cancel``: 200 the run;
* ``POST /api/outbound_calls/jobs/<id>/force-cancel``: 200 the run with
  ``cancelled_count`` and ``released_slots``.

A run is JSON in the monolith's vocabulary (:func:`run_json`). A POST takes an
optional ``{"reason": "..."}``. Every error is ``{"error": <a fixed text per
status>}``: runsvc's own messages never reach the browser. Another business's
run and a run that does not exist are the same 403.

Protections, for a host whose browser session is a cookie: a POST is refused
(415) unless it is ``application/json``, which an HTML form cannot send, and
(403) when its ``Origin`` (or, without one, its ``Referer``) is neither this
host nor in ``allowed_origins``. The run is checked to be the session's
business's even when ``token`` gives a token that could see more (admin).

:func:`bearer_blueprint` is the same endpoints for a caller that brings its own
``Authorization: Bearer`` token (runsvc-web): the token alone scopes what it sees.

Needs the ``flask`` extra: ``pip install 'runsvc-client[flask]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import flask
import grpc
from werkzeug.exceptions import HTTPException

from runsvc_client.backend import DEFAULT_TIMEOUT, BackendClient
from runsvc_client.balancing import Target, balanced_channel
from runsvc_client.errors import RunsvcError
from runsvc_client.models import Run

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
CROSS_SITE = "cross-site request refused"

# The whole of what an error body says: one fixed text per HTTP status.
ERROR_TEXT: dict[int, str] = {
    400: "bad request",
    401: "authentication required",
    403: NO_ACCESS,
    404: NO_ACTIVE_QUEUE,
    405: "method not allowed",
    409: "the queue cannot change in its current state",
    415: "send application/json",
    429: "too many requests, try again shortly",
    499: "request cancelled",
    500: "internal error",
    501: "not implemented",
    502: "the outbound-call service refused this server's credentials",
    503: "the outbound-call service is unavailable",
    504: "the outbound-call service did not answer in time",
}

Reply = tuple[flask.Response, int]


@dataclass(frozen=True)
class Session:
    """Who a request acts as: a token, and the business it is confined to (None: the token's)."""

    token: str
    business: str | None


class Refused(Exception):
    """Answer the request with this HTTP status and its fixed text."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def run_json(run: Run) -> dict[str, Any]:
    """A run as the monolith's UI knows it: ``id`` is its number, ``uuid`` runsvc's id."""
    counts = run.job_counts
    return {
        "id": run.number,
        "uuid": run.id,
        "status": run.state.value,
        "stop_reason": run.stop_reason or None,
        "cancel_requested": run.cancel_requested,
        "created_at": _time(run.create_time),
        "started_at": _time(run.start_time),
        "ended_at": _time(run.end_time),
        "last_heartbeat_at": _time(run.last_heartbeat_time),
        "locked_by_worker": run.worker_id or None,
        "total_count": counts.total,
        "queued_count": counts.queued,
        "in_progress_count": counts.in_progress,
        "completed_count": counts.completed,
        "failed_count": counts.failed,
    }


def _reply(body: dict[str, Any], status: int = 200) -> Reply:
    return flask.jsonify(body), status


def _error(status: int, text: str | None = None) -> Reply:
    return _reply({"error": text or ERROR_TEXT.get(status, ERROR_TEXT[500])}, status)


def _reason() -> str:
    body = flask.request.get_json(silent=True)
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        return str(body["reason"])
    return ""


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def _same_site(allowed: frozenset[str]) -> bool:
    """The POST comes from this host's pages, or from an allowed origin.

    Browsers send ``Origin`` with every cross-origin POST; a request with
    neither it nor a ``Referer`` comes from no page (curl, a server) and
    carries no ambient cookie of a victim.
    """
    request = flask.request
    claimed = request.headers.get("Origin")
    if claimed is None:
        referer = request.headers.get("Referer")
        if referer is None:
            return True
        claimed = referer
    origin = _origin_of(claimed)  # "null" (a sandboxed page) has none: refused
    if origin is None:
        return False
    return origin in allowed or urlsplit(origin).netloc == request.host.lower()


def _guard_post(allowed: frozenset[str]) -> Reply | None:
    if flask.request.method != "POST":
        return None
    if flask.request.mimetype != "application/json":
        return _error(415)
    if not _same_site(allowed):
        log.warning(
            "[SECURITY] cross-site request refused",
            extra={"origin": flask.request.headers.get("Origin"), "path": flask.request.path},
        )
        return _error(403, CROSS_SITE)
    return None


def _build(
    target: Target | grpc.Channel,
    session: Callable[[], Session],
    *,
    timeout: float,
    name: str,
    url_prefix: str,
    allowed_origins: Iterable[str],
) -> flask.Blueprint:
    channel = target if isinstance(target, grpc.Channel) else balanced_channel(target)
    allowed = frozenset(o.rstrip("/").lower() for o in allowed_origins)
    blueprint = flask.Blueprint(name, __name__, url_prefix=url_prefix)
    blueprint.before_request(lambda: _guard_post(allowed))

    @blueprint.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Reply:
        return _error(error.code or 500)

    def call(ref: str | None, action: Callable[[BackendClient, Session], Reply]) -> Reply:
        who: Session | None = None
        try:
            who = session()
            client = BackendClient(channel, token=who.token, timeout=timeout)
            return action(client, who)
        except Refused as refused:
            return _error(refused.status)
        except RunsvcError as error:
            status = HTTP_STATUS.get(error.code, 500)
            if status == 403 and ref is not None:
                _log_refusal(ref, who.business if who is not None else None)
            return _error(status)
        except Exception:
            log.exception("outbound-calls endpoint failed", extra={"path": flask.request.path})
            return _error(500)

    def owned(client: BackendClient, who: Session, ref: str) -> Run:
        """The run ``ref`` names, if it is the session's business's (else as if missing)."""
        run = client.get_run(ref)
        if who.business is not None and run.tenant_id != who.business:
            _log_refusal(ref, who.business)
            raise Refused(403)
        return run

    @blueprint.get("/jobs/active")
    def active() -> Reply:
        def action(client: BackendClient, who: Session) -> Reply:
            run = client.get_active(tenant_id=who.business or "")
            return _reply(run_json(run)) if run is not None else _error(404)

        return call(None, action)

    @blueprint.get("/jobs/<ref>")
    def one(ref: str) -> Reply:
        return call(ref, lambda client, who: _reply(run_json(owned(client, who, ref))))

    @blueprint.post("/jobs/<ref>/cancel")
    def cancel(ref: str) -> Reply:
        reason = _reason()

        def action(client: BackendClient, who: Session) -> Reply:
            run = owned(client, who, ref)
            return _reply(run_json(client.cancel(run.id, reason=reason)))

        return call(ref, action)

    @blueprint.post("/jobs/<ref>/force-cancel")
    def force_cancel(ref: str) -> Reply:
        reason = _reason()

        def action(client: BackendClient, who: Session) -> Reply:
            done = client.force_cancel(owned(client, who, ref).id, reason=reason)
            log.info(
                "[FORCE_CANCEL] run force-cancelled",
                extra={"run_id": done.run.id, "cancelled_count": done.cancelled_jobs},
            )
            return _reply(
                {
                    **run_json(done.run),
                    "cancelled_count": done.cancelled_jobs,
                    "released_slots": done.released_slots,
                }
            )

        return call(ref, action)

    return blueprint


def _log_refusal(ref: str, business: str | None) -> None:
    # The seed's audit tag: a business reached for a run that is not its own.
    log.warning(
        "[SECURITY] access to another business's run refused",
        extra={"tenant_id": business, "run_id": ref},
    )


def outbound_calls_blueprint(
    target: Target | grpc.Channel,
    *,
    tenant: Callable[[], str],
    token: Callable[[str], str],
    timeout: float = DEFAULT_TIMEOUT,
    name: str = "runsvc_outbound_calls",
    url_prefix: str = "/api/outbound_calls",
    allowed_origins: Iterable[str] = (),
) -> flask.Blueprint:
    """The blueprint for a host with its own sessions.

    ``tenant()`` names the request's business; ``token(business)`` gives a
    token to act for it. ``allowed_origins`` (``"https://app.example.com"``)
    may POST besides this host. A target or a list of addresses opens one
    balanced channel shared by every request.
    """

    def session() -> Session:
        business = tenant()
        return Session(token=token(business), business=business)

    return _build(
        target,
        session,
        timeout=timeout,
        name=name,
        url_prefix=url_prefix,
        allowed_origins=allowed_origins,
    )


def bearer_token() -> str:
    """The request's ``Authorization: Bearer`` token; 401 without one."""
    scheme, _, value = flask.request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Refused(401)
    return value.strip()


def bearer_blueprint(
    target: Target | grpc.Channel,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    name: str = "runsvc_outbound_calls",
    url_prefix: str = "/api/outbound_calls",
    allowed_origins: Iterable[str] = (),
) -> flask.Blueprint:
    """The blueprint acting as each request's own bearer token (runsvc's caller)."""
    return _build(
        target,
        lambda: Session(token=bearer_token(), business=None),
        timeout=timeout,
        name=name,
        url_prefix=url_prefix,
        allowed_origins=allowed_origins,
    )
