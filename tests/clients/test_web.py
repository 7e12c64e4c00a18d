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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from runsvc.server import Server
from runsvc.store import migrate
from runsvc_client import BackendClient, JobSpec
from runsvc_client.flask_blueprint import ERROR_TEXT
from tests.clients.conftest import address, token
from tests.e2e.security_server import es256, serving, settings_for
from tests.keys import make_pki, private_pem

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


@contextmanager
def running_web(grpc_address: str, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """runsvc-web on a free port in front of ``grpc_address``; yields its base URL."""
    environment = {
        **os.environ,
        "RUNSVC_WEB_ADDRESS": "127.0.0.1:0",
        "RUNSVC_GRPC_ADDRESS": grpc_address,
        **env,
    }
    process = subprocess.Popen([web_script()], env=environment, stderr=subprocess.PIPE)
    try:
        port = wait_for_port(process)
        yield f"http://127.0.0.1:{port}/api/outbound_calls", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        assert process.stderr is not None
        process.stderr.close()


@pytest.fixture
def web(server: Server) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with running_web(address(server)) as running:
        yield running


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


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RUNSVC_WEB_ADDRESS": "no-port"}, b"RUNSVC_WEB_ADDRESS"),
        ({"RUNSVC_WEB_THREADS": "0"}, b"RUNSVC_WEB_THREADS"),
        ({"RUNSVC_WEB_THREADS": "many"}, b"RUNSVC_WEB_THREADS"),
        ({"RUNSVC_GRPC_ADDRESS": "a.example:1,b.example:2"}, b"dns:///"),
        ({"RUNSVC_WEB_GRPC_CERT_FILE": "/c", "RUNSVC_WEB_GRPC_KEY_FILE": "/k"}, b"CA_FILE"),
        ({"RUNSVC_WEB_GRPC_CA_FILE": "/nonexistent/ca.pem"}, b"/nonexistent/ca.pem"),
    ],
    ids=["address", "threads", "threads-text", "grpc-names", "cert-without-ca", "missing-ca"],
)
def test_runsvc_web_refuses_bad_settings_at_start(env: dict[str, str], named: bytes) -> None:
    done = subprocess.run(
        [web_script()],
        env={**os.environ, "RUNSVC_WEB_ADDRESS": "127.0.0.1:0", **env},
        capture_output=True,
        timeout=STOP_TIMEOUT,
    )
    assert done.returncode == 2 and named in done.stderr


def test_runsvc_web_calls_runsvc_over_tls_with_the_ca_it_is_given(tmp_path: Path) -> None:
    pki = make_pki()
    files = {"cert": pki.server_cert_pem, "key": private_pem(pki.server_key), "ca": pki.ca_pem}
    for name, pem in files.items():
        (tmp_path / name).write_bytes(pem)
    url = f"sqlite:///{tmp_path / 'tls.db'}"
    migrate.upgrade(url)
    config = settings_for(
        url, tmp_path, tls_cert_file=tmp_path / "cert", tls_key_file=tmp_path / "key"
    )
    bearer = dict(es256("backend", "t1"))["authorization"].removeprefix("Bearer ")
    with serving(config) as tls_server:
        target = address(tls_server)
        with running_web(target, RUNSVC_WEB_GRPC_CA_FILE=str(tmp_path / "ca")) as (web, _):
            assert call(f"{web}/jobs/active", bearer=bearer) == (404, {"error": ERROR_TEXT[404]})
        # Without the CA it cannot reach a TLS-only runsvc.
        with running_web(target) as (web, _):
            assert call(f"{web}/jobs/active", bearer=bearer) == (503, {"error": ERROR_TEXT[503]})
