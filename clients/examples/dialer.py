#!/usr/bin/env python3
"""A simulated outbound dialer: a runsvc worker built on runsvc_client.

It claims runs (or resumes the one this worker id holds), "dials" each job
(a sleep with a random outcome), reports every result, honours cancel
requests, and stops working on a run as soon as its lease is lost.

    python clients/examples/dialer.py --address 127.0.0.1:50051,127.0.0.1:50052 \\
        --token "$(runsvc token --role worker --tenant acme)" --rate 20 --no-answer 0.2

SIGTERM or SIGINT stops it after the call in progress; the run is left to
this worker id, which resumes it when it starts again within the stale
threshold (or the service stops it when it does not).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from types import FrameType

from runsvc_client import Job, JobResult, Lease, LeaseLost, RunsvcError, WorkerClient
from runsvc_client.errors import DeadlineExceeded, Unavailable

OUTCOMES = ("answered", "no_answer", "busy", "error")


def say(worker_id: str, text: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} dialer[{worker_id}] {text}", flush=True)


class Dialer:
    def __init__(self, args: argparse.Namespace, stop: threading.Event) -> None:
        self.args = args
        self.stop = stop
        self.random = random.Random(args.seed)
        self.worker_id: str = args.worker_id

    def outcome(self) -> str:
        roll = self.random.random()
        for name, share in (
            ("no_answer", self.args.no_answer),
            ("busy", self.args.busy),
            ("error", self.args.error),
        ):
            if roll < share:
                return name
            roll -= share
        return "answered"

    def dial(self, job: Job) -> JobResult:
        # A call lasts 1/rate seconds on average (uniform in [0.5, 1.5] of it).
        self.stop.wait(self.random.uniform(0.5, 1.5) / self.args.rate)
        result = self.outcome()
        if result == "answered":
            return JobResult.completed(job.id)
        return JobResult.failed(job.id, result.upper())

    def report(self, lease: Lease, result: JobResult) -> bool:
        """Report one result; while the service is unreachable, retry until the lease fences."""
        while True:
            try:
                lease.report([result])
                return True
            except LeaseLost:
                return False
            except (Unavailable, DeadlineExceeded):
                if lease.lost.wait(0.2):
                    return False

    def work(self, lease: Lease) -> None:
        run_id = lease.run_id
        verb = "resumed" if lease.resumed else "claimed"
        say(self.worker_id, f"{verb} run {run_id} (lease epoch {lease.lease_epoch})")
        dialled = 0
        with lease:
            if lease.timing:
                say(
                    self.worker_id,
                    f"heartbeat every {lease.timing.heartbeat_interval:.1f} s, "
                    f"self-fence after {lease.timing.fence_after:.1f} s",
                )
            for job in lease.jobs(batch_size=self.args.batch):
                result = self.dial(job)
                dialled += 1
                if not self.report(lease, result):
                    break
                if dialled % self.args.progress_every == 0:
                    say(self.worker_id, f"run {run_id}: {dialled} calls dialled")
                if self.stop.is_set():
                    say(self.worker_id, f"stopping; run {run_id} is left to resume")
                    return
            if lease.lost.is_set():
                say(self.worker_id, f"lease on run {run_id} lost ({lease.lost_reason}); stopping")
                return
            try:
                run = lease.finish()
            except LeaseLost as error:
                say(self.worker_id, f"lease on run {run_id} lost at finish: {error}")
                return
            counts = run.job_counts
            say(
                self.worker_id,
                f"finished run {run_id}: {run.state.value} "
                f"({counts.completed} answered, {counts.failed} failed)",
            )

    def serve(self) -> int:
        client = WorkerClient(
            replicas(self.args.address),
            token=self.args.token,
            worker_id=self.worker_id,
            stale_after=self.args.stale_after,
        )
        runs = 0
        with client:
            while not self.stop.is_set():
                try:
                    lease = client.claim()
                except RunsvcError as error:
                    say(self.worker_id, f"claim failed: {error}")
                    self.stop.wait(self.args.poll)
                    continue
                if lease is None:
                    if self.args.exit_when_idle:
                        break
                    self.stop.wait(self.args.poll)
                    continue
                self.work(lease)
                runs += 1
                if self.args.runs and runs >= self.args.runs:
                    break
        say(self.worker_id, "exiting")
        return 0


def replicas(address: str) -> str | list[str]:
    """``a:p,b:p`` is a list of replicas; anything else one gRPC target."""
    if "," in address and not address.startswith(("ipv4:", "ipv6:", "dns:")):
        return address.split(",")
    return address


def share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("a share is between 0 and 1")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    default_address = os.environ.get("RUNSVC_GRPC_ADDRESS", "127.0.0.1:50051")
    parser.add_argument(
        "--address",
        default=default_address,
        help="host:port, replicas as a:p,b:p, or a gRPC target such as dns:///runsvc:50051",
    )
    parser.add_argument("--token", default=os.environ.get("RUNSVC_TOKEN"), help="worker token")
    parser.add_argument("--worker-id", default=f"dialer-{os.getpid()}")
    parser.add_argument("--rate", type=positive, default=10.0, help="calls per second")
    parser.add_argument("--no-answer", type=share, default=0.2, help="share of unanswered calls")
    parser.add_argument("--busy", type=share, default=0.1, help="share of busy lines")
    parser.add_argument("--error", type=share, default=0.05, help="share of carrier errors")
    parser.add_argument("--batch", type=int, default=5, help="jobs acquired at a time")
    parser.add_argument("--seed", type=int, help="for a repeatable outcome mix")
    parser.add_argument("--stale-after", type=positive, help="the server's stale threshold")
    parser.add_argument("--poll", type=positive, default=1.0, help="seconds between claims")
    parser.add_argument("--runs", type=int, default=0, help="exit after this many runs")
    parser.add_argument("--exit-when-idle", action="store_true")
    parser.add_argument("--progress-every", type=int, default=25)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.token:
        print("dialer: a worker token is needed (--token or RUNSVC_TOKEN)", file=sys.stderr)
        return 2
    if args.no_answer + args.busy + args.error > 1:
        print("dialer: the failure shares add up to more than 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start = time.monotonic()
    code = Dialer(args, stop).serve()
    say(args.worker_id, f"ran {time.monotonic() - start:.1f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
