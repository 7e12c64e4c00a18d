"""The Flask blueprint over real HTTP (werkzeug on loopback) against a real runsvc."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import flask
import grpc
import pytest
from werkzeug.serving import make_server

from runsvc.server import Server
from runsvc_client import BackendClient, JobSpec, WorkerClient
from runsvc_client.flask_blueprint import HTTP_STATUS, outbound_calls_blueprint
from tests.clients.conftest import address, token

HTTP_TIMEOUT = 10.0


@pytest.fixture
def web(server: Server) -> Iterator[str]:
    """A host app whose business comes from a header; returns its base URL."""
    app = flask.Flask("host")
    app.register_blueprint(
        outbound_calls_blueprint(
            address(server),
            tenant=lambda: flask.request.headers["X-Business-Id"],
            token=lambda business: token("backend", business),
        )
    )
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}/api/outbound_calls"
    http.shutdown()
    thread.join(timeout=10)
    http.server_close()


def request(
    url: str, *, business: str = "t1", method: str = "GET", body: Any = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("X-Business-Id", business)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_active_queue_then_none(web: str, server: Server) -> None:
    status, body = request(f"{web}/jobs/active")
    assert (status, body) == (404, {"error": "no active outbound queue"})
    backend = BackendClient(address(server), token=token("backend", "t1"))
    run = backend.create_run([JobSpec("a"), JobSpec("b")], request_id="r1")
    status, body = request(f"{web}/jobs/active")
    assert status == 200
    assert body["run"]["id"] == run.id and body["run"]["state"] == "pending"
    assert body["run"]["job_counts"] == {
        "total": 2,
        "queued": 2,
        "in_progress": 0,
        "completed": 0,
        "failed": 0,
    }
    assert request(f"{web}/jobs/active", business="t2")[0] == 404  # not t2's
    status, body = request(f"{web}/jobs/{run.id}/cancel", method="POST", body={"reason": "ui"})
    assert status == 200
    assert body["run"]["state"] == "cancelled" and body["run"]["cancel_reason"] == "ui"
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
        assert worker.claim() is not None  # running, and its worker never heartbeats
    with caplog.at_level("WARNING", logger="runsvc_client.flask"):
        status, body = request(f"{web}/jobs/{run.id}/force-cancel", business="t2", method="POST")
    assert status == 403
    assert body == {
        "error": "no access to this queue",
        "code": "PERMISSION_DENIED",
        "reason": "PERMISSION_DENIED",
    }
    assert any("[SECURITY]" in r.getMessage() for r in caplog.records)
    assert request(f"{web}/jobs/{run.id}/cancel", business="t2", method="POST")[0] == 403
    status, body = request(f"{web}/jobs/{run.id}/force-cancel", method="POST")
    assert status == 200
    assert body["cancelled_count"] == 5 and body["run"]["state"] == "cancelled"
    assert body["run"]["stop_reason"]
    status, body = request(f"{web}/jobs/{run.id}/force-cancel", method="POST")
    assert status == 200 and body["cancelled_count"] == 0
    status, body = request(f"{web}/jobs/not-a-run-id/cancel", method="POST")
    assert status == 400 and body["code"] == "INVALID_ARGUMENT"
    backend.close()


def test_every_status_code_maps_to_http() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
