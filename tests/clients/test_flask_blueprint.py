"""The Flask blueprint over real HTTP (werkzeug on loopback) against a real runsvc."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import flask
import grpc
import pytest
from werkzeug.serving import make_server

from runsvc.server import Server
from runsvc_client import BackendClient, JobSpec, WorkerClient
from runsvc_client.flask_blueprint import (
    CROSS_SITE,
    ERROR_TEXT,
    HTTP_STATUS,
    NO_ACCESS,
    NO_ACTIVE_QUEUE,
    outbound_calls_blueprint,
)
from tests.clients.conftest import address, token

HTTP_TIMEOUT = 10.0
RUN_FIELDS = {
    "id",
    "uuid",
    "status",
    "stop_reason",
    "cancel_requested",
    "created_at",
    "started_at",
    "ended_at",
    "last_heartbeat_at",
    "locked_by_worker",
    "total_count",
    "queued_count",
    "in_progress_count",
    "completed_count",
    "failed_count",
}


@contextmanager
def serving(app: flask.Flask) -> Iterator[str]:
    """``app`` on a free loopback port; yields the blueprint's base URL."""
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}/api/outbound_calls"
    finally:
        http.shutdown()
        thread.join(timeout=10)
        http.server_close()


def host_app(target: str, *, token_for: Callable[[str], str], **options: Any) -> flask.Flask:
    """A host app whose session's business comes from a header."""
    app = flask.Flask("host")
    app.register_blueprint(
        outbound_calls_blueprint(
            target,
            tenant=lambda: flask.request.headers["X-Business-Id"],
            token=token_for,
            **options,
        )
    )
    return app


@pytest.fixture
def web(server: Server) -> Iterator[str]:
    with serving(
        host_app(address(server), token_for=lambda business: token("backend", business))
    ) as url:
        yield url


def request(
    url: str,
    *,
    business: str = "t1",
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTP call; a JSON ``body`` is sent as application/json, ``raw`` as it is."""
    data = json.dumps(body).encode() if body is not None else raw
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("X-Business-Id", business)
    if body is not None or (method == "POST" and raw is None):
        req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def post(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    return request(url, method="POST", **kwargs)


def test_endpoints_speak_the_monoliths_vocabulary(web: str, server: Server) -> None:
    assert request(f"{web}/jobs/active") == (404, {"error": NO_ACTIVE_QUEUE})
    backend = BackendClient(address(server), token=token("backend", "t1"))
    run = backend.create_run([JobSpec("a"), JobSpec("b")], request_id="r1")
    status, body = request(f"{web}/jobs/active")
    assert status == 200 and set(body) == RUN_FIELDS
    assert body["id"] == run.number and isinstance(body["id"], int) and body["id"] >= 1
    assert body["uuid"] == run.id and body["status"] == "pending"
    assert body["stop_reason"] is None and body["locked_by_worker"] is None
    assert body["ended_at"] is None and body["created_at"] == run.create_time.isoformat()
    assert (body["total_count"], body["queued_count"], body["in_progress_count"]) == (2, 2, 0)
    assert request(f"{web}/jobs/{run.number}") == (200, body)
    assert request(f"{web}/jobs/{run.id}") == (200, body)
    assert request(f"{web}/jobs/active", business="t2")[0] == 404  # not t2's
    status, cancelled = post(f"{web}/jobs/{run.number}/cancel", body={"reason": "ui"})
    assert status == 200 and cancelled["status"] == "cancelled" and cancelled["id"] == run.number
    assert cancelled["stop_reason"] == "CANCELLED_BY_USER" and cancelled["ended_at"]
    assert request(f"{web}/jobs/active")[0] == 404
    backend.close()


def test_force_cancel_counts_and_refuses_other_businesses(
    web: str, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    backend = BackendClient(address(server), token=token("backend", "t1"))
    run = backend.create_run([JobSpec(f"c{i}") for i in range(5)], request_id="r1")
    with WorkerClient(
        address(server), token=token("worker", "t1", subject="w"), worker_id="w"
    ) as worker:
        lease = worker.claim()
        assert lease is not None
        taken, _ = lease.acquire(2)  # two slots held, then the worker dies
    assert len(taken) == 2
    status, body = request(f"{web}/jobs/active")
    assert (status, body["status"], body["locked_by_worker"]) == (200, "running", "w")
    with caplog.at_level("WARNING", logger="runsvc_client.flask"):
        foreign = post(f"{web}/jobs/{run.number}/force-cancel", business="t2")
    assert foreign == (403, {"error": NO_ACCESS})
    assert any("[SECURITY]" in r.getMessage() for r in caplog.records)
    # Another business's run and a run nobody has are the same answer, by number or id.
    assert post(f"{web}/jobs/{run.number + 1000}/force-cancel", business="t2") == foreign
    assert post(f"{web}/jobs/{run.id}/cancel", business="t2") == foreign
    assert request(f"{web}/jobs/{run.number}", business="t2") == foreign
    assert request(f"{web}/jobs/00000000-0000-4000-8000-000000000000") == foreign
    status, body = post(f"{web}/jobs/{run.number}/force-cancel")
    assert status == 200 and set(body) == RUN_FIELDS | {"cancelled_count", "released_slots"}
    assert (body["cancelled_count"], body["released_slots"]) == (5, 2)
    assert body["status"] == "cancelled" and body["stop_reason"] == "FORCE_CANCELLED"
    assert body["locked_by_worker"] is None or body["locked_by_worker"] == "w"
    status, again = post(f"{web}/jobs/{run.number}/force-cancel")
    assert status == 200 and again["cancelled_count"] == 0
    assert post(f"{web}/jobs/not-a-run-id/cancel") == (400, {"error": ERROR_TEXT[400]})
    backend.close()


def test_cross_site_posts_change_nothing(server: Server) -> None:
    backend = BackendClient(address(server), token=token("backend", "t1"))
    run = backend.create_run([JobSpec("a")], request_id="r1")
    app = host_app(
        address(server),
        token_for=lambda business: token("backend", business),
        allowed_origins=["https://app.example.com"],
    )
    with serving(app) as web:
        url = f"{web}/jobs/{run.number}/force-cancel"
        evil = {"Origin": "https://evil.example"}
        # What an HTML form on another site can send: refused before anything is done.
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            answer = post(url, raw=b"reason=x", headers={**evil, "Content-Type": content_type})
            assert answer == (415, {"error": ERROR_TEXT[415]})
        refused = (403, {"error": CROSS_SITE})
        assert post(url, body={}, headers=evil) == refused
        assert post(url, body={}, headers={"Referer": "https://evil.example/page"}) == refused
        assert post(url, body={}, headers={"Origin": "null"}) == refused
        assert post(f"{web}/jobs/{run.number}/cancel", body={}, headers=evil) == refused
        assert backend.get_run(run.id).state.active
        assert request(f"{web}/jobs/active", headers=evil)[0] == 200  # reads are harmless
        # The host's own pages, and the allowed origin, may.
        own = web.rsplit("/api/", 1)[0]
        assert post(f"{web}/jobs/{run.number}/cancel", body={}, headers={"Origin": own})[0] == 200
        allowed = {"Origin": "https://app.example.com"}
        assert post(url, body={}, headers=allowed)[0] == 200
    backend.close()


def test_an_admin_token_factory_stays_within_the_sessions_business(server: Server) -> None:
    backend = BackendClient(address(server), token=token("backend", "t1"))
    run = backend.create_run([JobSpec("a")], request_id="r1")
    app = host_app(address(server), token_for=lambda business: token("admin", None))
    with serving(app) as web:
        foreign = (403, {"error": NO_ACCESS})
        assert request(f"{web}/jobs/{run.number}", business="t2") == foreign
        assert post(f"{web}/jobs/{run.number}/force-cancel", business="t2") == foreign
        assert post(f"{web}/jobs/{run.id}/cancel", business="t2") == foreign
        assert request(f"{web}/jobs/active", business="t2") == (404, {"error": NO_ACTIVE_QUEUE})
        assert backend.get_run(run.id).state.active
        assert request(f"{web}/jobs/active")[1]["uuid"] == run.id
        assert post(f"{web}/jobs/{run.number}/force-cancel")[0] == 200
    backend.close()


def test_error_bodies_are_fixed_texts(server: Server) -> None:
    refused_token = host_app(address(server), token_for=lambda business: "not-a-token")
    with serving(refused_token) as web:
        assert request(f"{web}/jobs/active") == (502, {"error": ERROR_TEXT[502]})
    # No runsvc behind it: the channel's own error text stays on the server.
    closed = host_app("127.0.0.1:1", token_for=lambda business: token("backend", business))
    with serving(closed) as web:
        assert request(f"{web}/jobs/active") == (503, {"error": ERROR_TEXT[503]})
        assert post(f"{web}/jobs/7/cancel") == (503, {"error": ERROR_TEXT[503]})
    assert set(ERROR_TEXT) >= set(HTTP_STATUS.values())


def test_every_status_code_maps_to_http() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
