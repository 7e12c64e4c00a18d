#!/usr/bin/env python3
"""The three scenarios of the monolith's report, replayed on a fresh server (``make demo``).

1. Server restart: a run of 100 calls with a live dialer; ``kill -9`` the server
   and its dialer (in the monolith they were one process), start the server
   again: the UI shows no active queue within the stale threshold.
2. Worker crash: ``kill -9`` only the dialer; the stuck run is cleared.
3. Force cancel: ``kill -9`` the dialer; a plain cancel cannot finish the run
   (nobody is left to acknowledge it), force cancel ends it at once.

Every second it prints what the UI would show (the tenant's active run, from
GetActive). The stale threshold is shortened to ``--stale-after`` seconds
(default 5; production's is 30) so that the whole replay takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from runsvc import tokens
from runsvc_client import BackendClient, JobSpec, Run, RunsvcError

ROOT = Path(__file__).resolve().parents[1]
DIALER = ROOT / "clients" / "examples" / "dialer.py"
TENANT = "acme"
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[+{time.monotonic() - STARTED:5.1f} s] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def describe(run: Run) -> str:
    c = run.job_counts
    text = (
        f"run {run.number} {run.state.value}: {c.completed} answered, {c.failed} failed, "
        f"{c.in_progress} in progress, {c.queued} queued"
    )
    if run.stop_reason:
        text += f" ({run.stop_reason})"
    if run.cancel_requested and run.state.active:
        text += ", cancel requested"
    return text


def wait_until(check: Callable[[], bool], *, timeout: float, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: gave up after {timeout} s")
        time.sleep(step)


class Demo:
    def __init__(self, stale_after: float) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="runsvc-demo-"))
        self.secret = secrets.token_urlsafe(32)
        self.address = f"127.0.0.1:{free_port()}"
        self.stale_after = stale_after
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSVC_")}
        self.env.update(
            RUNSVC_DATA_DIR=str(self.data),
            RUNSVC_GRPC_ADDRESS=self.address,
            RUNSVC_JWT_SECRET=self.secret,
            RUNSVC_STALE_AFTER_SECONDS=str(stale_after),
            RUNSVC_REAP_INTERVAL_SECONDS="1",
            # Any free port: the demo must not collide with a runsvc already serving metrics.
            RUNSVC_METRICS_ADDRESS="127.0.0.1:0",
        )
        self.server: subprocess.Popen[bytes] | None = None
        self.backend = BackendClient(
            self.address,
            token=tokens.issue(self.secret, role="backend", tenant_id=TENANT, ttl_seconds=3600),
        )

    def start_server(self) -> None:
        log = (self.data / "server.log").open("ab")
        runsvc = Path(sys.executable).with_name("runsvc")
        self.server = subprocess.Popen(
            [str(runsvc), "serve"], env=self.env, stdout=subprocess.DEVNULL, stderr=log
        )
        log.close()
        wait_until(self._serving, timeout=30)
        say(f"runsvc serving on {self.address} (pid {self.server.pid})")

    def _serving(self) -> bool:
        try:
            self.backend.get_active()
        except RunsvcError:
            return False
        return True

    def start_dialer(self, worker_id: str) -> subprocess.Popen[bytes]:
        token = tokens.issue(
            self.secret, role="worker", tenant_id=TENANT, ttl_seconds=3600, subject=worker_id
        )
        flags = ["--worker-id", worker_id, "--rate", "8", "--seed", "1"]
        flags += ["--stale-after", str(self.stale_after)]
        return subprocess.Popen(
            [sys.executable, str(DIALER), "--address", self.address, "--token", token, *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def create_run(self, name: str) -> Run:
        run = self.backend.create_run(
            [JobSpec(f"call-{i:03}", b"+97250%07d" % i) for i in range(100)], request_id=name
        )
        say(f"created run {run.number} with 100 calls")
        return run

    def dial_a_little(self, run: Run, worker_id: str) -> subprocess.Popen[bytes]:
        dialer = self.start_dialer(worker_id)
        wait_until(lambda: self.backend.get_run(run.id).job_counts.completed >= 5, timeout=60)
        say(f"dialer {worker_id} at work: {describe(self.backend.get_run(run.id))}")
        return dialer

    def ui_until_clear(self, limit: float, *, since: float) -> float:
        """What the UI shows, each second, until no queue is active: the seconds since
        ``since`` (the kill) that took."""
        while time.monotonic() - since < limit:
            try:
                active = self.backend.get_active()
            except RunsvcError as error:  # a server still starting counts as "not yet"
                say(f"UI: (no answer yet: {type(error).__name__})")
                time.sleep(1)
                continue
            if active is None:
                waited = time.monotonic() - since
                say(f"UI: no active queue ({waited:.1f} s after the kill)")
                return waited
            beat = active.last_heartbeat_time
            age = (datetime.now(beat.tzinfo) - beat).total_seconds() if beat else float("nan")
            say(f"UI: queue ACTIVE, {describe(active)}, silent {age:4.1f} s")
            time.sleep(1)
        raise SystemExit(f"demo: the queue still showed active after {limit} s")

    def kill(self, process: subprocess.Popen[bytes], name: str) -> float:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        say(f"kill -9 {name} (pid {process.pid})")
        return time.monotonic()

    def close(self) -> None:
        self.backend.close()
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=10)
        shutil.rmtree(self.data, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stale-after", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args()
    demo = Demo(args.stale_after)
    bound = args.stale_after + 15  # the threshold, a reaper pass, a restart
    try:
        demo.start_server()

        say("--- 1. server restart: kill -9 the server and its dialer, start the server again")
        run = demo.create_run("demo-1")
        dialer = demo.dial_a_little(run, "dialer-1")
        assert demo.server is not None
        killed = demo.kill(demo.server, "the server")
        demo.kill(dialer, "its dialer")
        demo.start_server()
        demo.ui_until_clear(bound, since=killed)
        say(describe(demo.backend.get_run(run.id)))

        say("--- 2. worker crash: kill -9 the dialer only")
        run = demo.create_run("demo-2")
        killed = demo.kill(demo.dial_a_little(run, "dialer-2"), "the dialer")
        demo.ui_until_clear(bound, since=killed)
        say(describe(demo.backend.get_run(run.id)))

        say("--- 3. force cancel: kill -9 the dialer, cancel, then force cancel")
        run = demo.create_run("demo-3")
        killed = demo.kill(demo.dial_a_little(run, "dialer-3"), "the dialer")
        cancelled = demo.backend.cancel(run.id, reason="user pressed cancel")
        say(f"Cancel: {describe(cancelled)} (nobody is left to acknowledge it)")
        done = demo.backend.force_cancel(run.id, reason="worker is dead")
        say(
            f"ForceCancel: {describe(done.run)}; cancelled_count={done.cancelled_jobs}, "
            f"released_slots={done.released_slots}"
        )
        demo.ui_until_clear(bound, since=killed)
        say("done: all three scenarios end with no active queue")
        return 0
    finally:
        demo.close()


if __name__ == "__main__":
    raise SystemExit(main())
