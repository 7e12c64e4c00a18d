"""runsvc-web as a real process (its console script) against a real runsvc, over HTTP."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runsvc.server import Server
from runsvc_client import BackendClient, JobSpec
from runsvc_client.flask_blueprint import ERROR_TEXT
from tests.clients.conftest import address, token

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
HTTP_TIMEOUT = 10.0
SERVING = re.compile(rb"serving on http://127\.0\.0\.1:(\d+)")


def web_script() -> str:
    found = shutil.which("runsvc-web", path=str(Path(sys.executable).parent))
    assert found, "runsvc-web is not installed next to this Python (make install)"
    return found


def wait_for_port(process: subprocess.Popen[bytes]) -> int:
    """Read the process's log until it says where it serves; fail after START_TIMEOUT."""
    assert process.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    seen = b""
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = process.stderr.readline()
        if not line:
            break
        seen += line
        match = SERVING.search(line)
        if match:
            return int(match.group(1))
    process.kill()
    pytest.fail(f"runsvc-web did not start serving: {seen.decode(errors='replace')}")


@pytest.fixture
def web(server: Server) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    env = {
        **os.environ,
        "RUNSVC_WEB_ADDRESS": "127.0.0.1:0",
        "RUNSVC_GRPC_ADDRESS": address(server),
    }
    process = subprocess.Popen([web_script()], env=env, stderr=subprocess.PIPE)
    try:
        port = wait_for_port(process)
        yield f"http://127.0.0.1:{port}/api/outbound_calls", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        assert process.stderr is not None
        process.stderr.close()


def call(
    url: str, *, bearer: str | None, method: str = "GET", body: Any = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, method=method, data=data)
    if bearer is not None:
        req.add_header("Authorization", f"Bearer {bearer}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as response:
            assert response.headers["Server"] == "waitress"
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_runsvc_web_serves_the_four_endpoints_with_the_callers_token(
    web: tuple[str, subprocess.Popen[bytes]], server: Server
) -> None:
    url, process = web
    mine, theirs = token("backend", "t1"), token("backend", "t2")
    backend = BackendClient(address(server), token=mine)
    assert call(f"{url}/jobs/active", bearer=mine)[0] == 404
    first = backend.create_run([JobSpec("a"), JobSpec("b")], request_id="r1")

    # No token, or not a bearer one: 401, and nothing reaches runsvc.
    unauthenticated = (401, {"error": ERROR_TEXT[401]})
    assert call(f"{url}/jobs/active", bearer=None) == unauthenticated
    assert call(f"{url}/jobs/{first.number}/force-cancel", bearer=None, method="POST", body={}) == (
        unauthenticated
    )

    status, active = call(f"{url}/jobs/active", bearer=mine)
    assert status == 200 and (active["id"], active["uuid"]) == (first.number, first.id)
    assert call(f"{url}/jobs/{first.number}", bearer=mine) == (200, active)
    # The token is the caller: another tenant's token sees nothing of it.
    assert call(f"{url}/jobs/{first.number}", bearer=theirs) == (403, {"error": ERROR_TEXT[403]})
    assert call(f"{url}/jobs/active", bearer=theirs)[0] == 404

    status, cancelled = call(
        f"{url}/jobs/{first.number}/cancel", bearer=mine, method="POST", body={"reason": "ui"}
    )
    assert status == 200 and cancelled["status"] == "cancelled"

    second = backend.create_run([JobSpec("c")] * 1, request_id="r2")
    assert second.number > first.number
    status, forced = call(
        f"{url}/jobs/{second.number}/force-cancel", bearer=mine, method="POST", body={}
    )
    assert status == 200 and (forced["cancelled_count"], forced["released_slots"]) == (1, 0)
    assert backend.get_active() is None
    backend.close()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=STOP_TIMEOUT) == 0


def test_runsvc_web_refuses_a_bad_address() -> None:
    done = subprocess.run(
        [web_script()],
        env={**os.environ, "RUNSVC_WEB_ADDRESS": "no-port"},
        capture_output=True,
        timeout=STOP_TIMEOUT,
    )
    assert done.returncode == 2 and b"RUNSVC_WEB_ADDRESS" in done.stderr
