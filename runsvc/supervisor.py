"""``runsvc serve --workers N``: N server processes on one port, kept running.

One Python process serves gRPC on one core at a time (the GIL), so a host with
several cores runs several. The supervisor starts N ``runsvc serve`` processes
that listen on the same address with ``SO_REUSEPORT``: the kernel spreads new
connections over them. It serves nothing itself and opens no database
connection. Each process is an ordinary replica: its own reaper, pool,
heartbeat batcher and metrics.

* Process ``i`` serves its metrics on the metrics port + ``i`` (each picks a free
  port when the port is 0); Prometheus scrapes every one of them.
* SIGTERM or SIGINT is passed on as SIGTERM: every process drains (health goes
  NOT_SERVING, calls in flight finish), then the supervisor exits 0.
* A process that dies is logged and started again after a backoff that doubles
  with each crash in a row (0.5 s up to 30 s). One that exits before serving,
  five times in a row, stops them all: the supervisor exits 1, since something
  outside (the port, the database, the settings) will not let it start.
* Only process 0 runs the startup cleanup: the others would scan the same rows.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from runsvc import shutdown, tokens
from runsvc.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MAX_WORKERS = 64
EXIT_GAVE_UP = 1
POLL_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    # Exits before serving, in a row, after which the supervisor gives up.
    max_start_failures: int = 5
    # A process that served this long starts its count of crashes afresh.
    stable_after: float = 60.0

    def backoff(self, crashes: int) -> float:
        return float(min(self.max_backoff, self.initial_backoff * 2 ** max(crashes - 1, 0)))


def _port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def check_shareable(settings: Settings, workers: int) -> None:
    """Raise SettingsError when ``workers`` processes cannot share these settings."""
    if not 1 <= workers <= MAX_WORKERS:
        raise SettingsError(f"--workers must be between 1 and {MAX_WORKERS}")
    if workers == 1:
        return
    problems = []
    if _port(settings.grpc_address)[1] == 0:
        problems.append(
            f"RUNSVC_GRPC_ADDRESS={settings.grpc_address!r}: --workers {workers} needs an "
            "explicit port; port 0 would give each process a different one"
        )
    if settings.effective_database_url.startswith("sqlite"):
        problems.append(
            f"--workers {workers} needs PostgreSQL (RUNSVC_DATABASE_URL): the embedded SQLite "
            "file takes one writer at a time, so its processes would wait on each other's locks"
        )
    if settings.metrics_address is not None:
        port = _port(settings.metrics_address)[1]
        if port and port + workers - 1 > 65535:
            problems.append(
                f"RUNSVC_METRICS_ADDRESS={settings.metrics_address!r}: process i serves its "
                f"metrics on port {port} + i, and {port + workers - 1} is not a port"
            )
    if problems:
        raise SettingsError("cannot serve with several processes:\n  " + "\n  ".join(problems))


def metrics_address(base: str | None, index: int) -> str:
    """Where process ``index`` serves its metrics (``off`` when nobody does)."""
    if base is None:
        return "off"
    host, port = _port(base)
    return f"{host}:{port + index if port else 0}"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, so no process is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans are left to the service manager
        pass


@dataclass
class Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # the read end of the pipe the process writes once serving
    serving_since: float | None = None
    crashes: int = 0
    start_failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        workers: int,
        *,
        command: Sequence[str],
        environ: Mapping[str, str],
        policy: RestartPolicy | None = None,
    ) -> None:
        self._settings = settings
        self._command = list(command)
        self._environ = dict(environ)
        self._policy = policy or RestartPolicy()
        self.children = [Child(i) for i in range(workers)]
        self._all_serving_logged = False

    def run(self, stop: threading.Event) -> int:
        """Keep the processes running until ``stop``; 1 if they keep failing at start."""
        for child in self.children:
            self._start(child)
        code = 0
        while not stop.is_set():
            self._read_ready()
            now = time.monotonic()
            for child in self.children:
                if child.process is None:
                    if now >= child.restart_at and not stop.is_set():
                        self._start(child)
                elif child.process.poll() is not None and not self._exited(child, now):
                    code = EXIT_GAVE_UP
                    stop.set()
        self._stop_all()
        return code

    def _start(self, child: Child) -> None:
        read_fd, write_fd = os.pipe()
        args = [
            *self._command,
            "serve",
            "--replica-index",
            str(child.index),
            "--ready-fd",
            str(write_fd),
        ]
        if child.index != 0:
            args.append("--no-startup-cleanup")
        env = {
            **self._environ,
            "RUNSVC_METRICS_ADDRESS": metrics_address(self._settings.metrics_address, child.index),
        }
        try:
            child.process = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_fd,),
                preexec_fn=_die_with_parent,  # safe: the supervisor starts no thread
            )
        finally:
            os.close(write_fd)
        child.ready_fd = read_fd
        child.serving_since = None
        log.info("worker started", extra={"worker": child.index, "pid": child.process.pid})

    def _read_ready(self) -> None:
        watched = {c.ready_fd: c for c in self.children if c.ready_fd is not None}
        if not watched:
            time.sleep(POLL_SECONDS)
            return
        readable, _, _ = select.select(list(watched), [], [], POLL_SECONDS)
        for fd in readable:
            child = watched[fd]
            if os.read(fd, 1):
                child.serving_since = time.monotonic()
                child.start_failures = 0
                pid = child.process.pid if child.process else None
                log.info("worker serving", extra={"worker": child.index, "pid": pid})
            # Serving, or the process closed the pipe on its way out: either way, done.
            os.close(fd)
            child.ready_fd = None
        if not self._all_serving_logged and all(c.serving_since for c in self.children):
            self._all_serving_logged = True
            log.info(
                "serving",
                extra={"address": self._settings.grpc_address, "workers": len(self.children)},
            )

    def _exited(self, child: Child, now: float) -> bool:
        """Schedule the restart of ``child``; False when it keeps failing at start."""
        assert child.process is not None
        code = child.process.returncode
        if child.ready_fd is not None:
            # Its write end is closed now: this read answers at once.
            if os.read(child.ready_fd, 1):
                child.serving_since, child.start_failures = now, 0
            os.close(child.ready_fd)
            child.ready_fd = None
        served = child.serving_since is not None
        if served and child.serving_since is not None:
            if now - child.serving_since >= self._policy.stable_after:
                child.crashes = 0
        else:
            child.start_failures += 1
        child.crashes += 1
        delay = self._policy.backoff(child.crashes)
        detail = {
            "worker": child.index,
            "pid": child.process.pid,
            "exit_code": code,
            "signal": signal.Signals(-code).name if code < 0 else None,
            "served": served,
        }
        child.process = None
        if child.start_failures >= self._policy.max_start_failures:
            log.error(
                "worker keeps failing at start; stopping every worker",
                extra={**detail, "start_failures": child.start_failures},
            )
            return False
        child.restart_at = now + delay
        log.error("worker exited; restarting it", extra={**detail, "restart_in_seconds": delay})
        return True

    def _stop_all(self) -> None:
        running = [c.process for c in self.children if c.process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.shutdown_grace_seconds + 15
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing it", extra={"pid": process.pid})
                process.kill()
                process.wait()
        for child in self.children:
            if child.ready_fd is not None:
                os.close(child.ready_fd)
                child.ready_fd = None
        log.info("stopped", extra={"workers": len(self.children)})


def serve(settings: Settings, workers: int, *, policy: RestartPolicy | None = None) -> int:
    """Supervise ``workers`` server processes until SIGTERM or SIGINT."""
    if (
        settings.jwt_secret is None
        and settings.jwt_secret_path is None
        and ("HS256" in settings.jwt_algorithms)
    ):
        # Created once, here: processes starting together would race to write it.
        tokens.load_or_create_secret(settings.jwt_secret_file)
    stop = shutdown.stop_on_signals()
    supervisor = Supervisor(
        settings,
        workers,
        command=[sys.executable, "-m", "runsvc.cli"],
        environ=os.environ,
        policy=policy,
    )
    return supervisor.run(stop)
