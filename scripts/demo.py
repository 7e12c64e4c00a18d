#!/usr/bin/env python3
"""The seed's worker-crash and force-cancel scenarios, automated (``make demo``).

Starts ``runsvc serve`` on a fresh SQLite file with the default thresholds
(stale after 30 s, reaper every 5 s), creates a run of 100 calls, starts the
example dialer, kills it with SIGKILL, and shows the run going stale and
GetActive answering "none"; then a second run whose worker is killed, a plain
cancel that cannot finish it, and a force-cancel that does, with its count.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from runsvc import tokens
from runsvc_client import BackendClient, JobSpec, Run, RunState

ROOT = Path(__file__).resolve().parents[1]
DIALER = ROOT / "clients" / "examples" / "dialer.py"
TENANT = "acme"
STARTED = time.monotonic()


def say(text: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} demo  [+{time.monotonic() - STARTED:5.1f} s] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def describe(run: Run) -> str:
    c = run.job_counts
    text = (
        f"{run.state.value}, {c.completed} answered, {c.failed} failed, "
        f"{c.in_progress} in progress, {c.queued} queued"
    )
    if run.stop_reason:
        text += f", reason {run.stop_reason}"
    if run.cancel_requested and run.state.active:
        text += ", cancel requested"
    return text


def wait_until(check: object, *, timeout: float, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: gave up after {timeout} s")
        time.sleep(step)


def start_dialer(address: str, secret: str, worker_id: str) -> subprocess.Popen[bytes]:
    token = tokens.issue(
        secret, role="worker", tenant_id=TENANT, ttl_seconds=3600, subject=worker_id
    )
    flags = ["--worker-id", worker_id, "--rate", "8", "--seed", "1", "--progress-every", "10"]
    return subprocess.Popen(
        [sys.executable, str(DIALER), "--address", address, "--token", token, *flags]
    )


def kill(process: subprocess.Popen[bytes], name: str) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    say(f"kill -9 {name} (pid {process.pid}): exit {process.returncode}")


def main() -> int:
    data = Path(tempfile.mkdtemp(prefix="runsvc-demo-"))
    secret = secrets.token_urlsafe(32)
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSVC_")}
    env.update(
        RUNSVC_DATA_DIR=str(data),
        RUNSVC_GRPC_ADDRESS=address,
        RUNSVC_JWT_SECRET=secret,
        # Any free port: the demo must not collide with a runsvc already serving metrics.
        RUNSVC_METRICS_ADDRESS="127.0.0.1:0",
    )
    server_log = data / "server.log"
    runsvc = Path(sys.executable).with_name("runsvc")
    say(f"starting runsvc on {address}, database {data / 'runsvc.db'} (fresh)")
    with server_log.open("wb") as log:
        server = subprocess.Popen([str(runsvc), "serve"], env=env, stderr=log)
    backend = BackendClient(
        address,
        token=tokens.issue(secret, role="backend", tenant_id=TENANT, ttl_seconds=3600),
    )
    try:
        wait_until(lambda: "serving" in server_log.read_text(), timeout=30, step=0.2)
        say("server is serving (stale after 30 s, reaper every 5 s: the defaults)")
        run = backend.create_run(
            [JobSpec(f"call-{i:03}", b"+97250%07d" % i) for i in range(100)],
            request_id="demo-run-1",
        )
        say(f"created run {run.id} with 100 calls")

        # Scenario 2: the worker crashes; the run must not stay "active".
        dialer = start_dialer(address, secret, "dialer-1")
        wait_until(lambda: backend.get_run(run.id).job_counts.completed >= 15, timeout=60)
        kill(dialer, "the dialer")
        say(f"run {run.id}: {describe(backend.get_run(run.id))}")
        while (active := backend.get_active()) is not None:
            beat = active.last_heartbeat_time
            age = (datetime.now(beat.tzinfo) - beat).total_seconds() if beat else float("nan")
            say(f"GetActive: run {active.id} still {active.state.value}, silent {age:4.1f} s")
            time.sleep(5)
        say("GetActive: none (the UI shows no active queue)")
        say(f"run {run.id}: {describe(backend.get_run(run.id))}")

        # Scenario 3: force cancel works at once while the worker is dead.
        second = backend.create_run(
            [JobSpec(f"call-{i:03}") for i in range(100)], request_id="demo-run-2"
        )
        say(f"created run {second.id} with 100 calls")
        dialer = start_dialer(address, secret, "dialer-2")
        wait_until(lambda: backend.get_run(second.id).job_counts.completed >= 5, timeout=60)
        kill(dialer, "the dialer")
        cancelled = backend.cancel(second.id, reason="user pressed cancel")
        say(f"Cancel: run {second.id} {describe(cancelled)} (nobody left to act on it)")
        done = backend.force_cancel(second.id, reason="worker is dead")
        say(
            f"ForceCancel: run {second.id} {describe(done.run)}; "
            f"cancelled_count={done.cancelled_jobs}, released_slots={done.released_slots}"
        )
        active = backend.get_active()
        say(f"GetActive: {'none' if active is None else active.id}")
        assert active is None and done.run.state is RunState.CANCELLED
        say("audit lines from the server log:")
        for line in server_log.read_text().splitlines():
            if '"STALE_DETECTION"' in line or '"FORCE_CANCEL"' in line:
                record = json.loads(line)
                fields = {k: record[k] for k in ("tag", "run_id", "reason") if k in record}
                print(f"    {record.get('time', '')} {record.get('message', '')} {fields}")
        say("done")
        return 0
    finally:
        backend.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
