"""A worker's lease on a run: background heartbeats, cancel, and self-fencing.

Timing (``T`` is the server's stale threshold, 30 s by default):

* heartbeats every ``T/3`` (minus up to 10 % jitter, so workers started
  together spread out), as etcd's client and kubelet do;
* a failed heartbeat is retried with backoff, each try with a deadline no
  later than the fencing deadline;
* **self-fencing**: when no heartbeat (or other lease call) has been
  acknowledged within ``fence_after`` (default ``2T/3``) of the *send* time
  of the last acknowledged one, on the monotonic clock, the lease declares
  itself lost. The server refreshed the lease no earlier than that send
  time, so it cannot consider the run stale before ``send + T``: the worker
  has stopped at least ``T/3`` before the run can be given to anyone else,
  whatever the network delayed;
* ``LEASE_LOST`` (or any answer saying the run is no longer this lease's)
  makes the lease lost at once.

The threshold is an option; when it is not given, the lease learns it from
the first heartbeat's ``stale_time`` without trusting the wall clocks to
agree: the claim answered with the server's time ``c`` (the run's
``last_heartbeat_time``), the heartbeat with ``stale_time = h + T``, and
``h - c`` is at most the local time from sending the claim to receiving the
heartbeat's answer. So ``stale_time - c - elapsed`` never overestimates
``T``; it underestimates it by the round trips, which only makes the
worker beat and fence a little earlier.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

from runsvc_client._transport import Transport
from runsvc_client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    LeaseLost,
    PermissionDenied,
    RunsvcError,
    Unavailable,
)
from runsvc_client.models import Job, JobResult, Reported, Run, RunOutcome
from runsvc_client.retry import NO_RETRY, RetryPolicy
from runsvc_client.v1 import run_service_pb2 as pb

log = logging.getLogger("runsvc_client.lease")

HEARTBEAT_FRACTION = 1 / 3
FENCE_FRACTION = 2 / 3
JITTER = 0.1
MIN_CALL_TIMEOUT = 0.05

# Answers that mean the run is no longer this lease's: stop at once.
_LOSING_ERRORS = (FailedPrecondition, PermissionDenied)
_TRANSIENT_ERRORS = (Unavailable, DeadlineExceeded)


@dataclass(frozen=True)
class LeaseTiming:
    """The three durations of a lease, in seconds."""

    stale_after: float
    """The server's threshold: a run silent this long is stale."""
    heartbeat_interval: float
    fence_after: float
    """The self-fencing budget, counted from the send time of the last acknowledged call."""

    @classmethod
    def derive(
        cls,
        stale_after: float,
        *,
        heartbeat_interval: float | None = None,
        fence_after: float | None = None,
    ) -> LeaseTiming:
        timing = cls(
            stale_after=stale_after,
            heartbeat_interval=heartbeat_interval or stale_after * HEARTBEAT_FRACTION,
            fence_after=fence_after or stale_after * FENCE_FRACTION,
        )
        if not 0 < timing.heartbeat_interval < timing.fence_after < timing.stale_after:
            raise ValueError(
                "need 0 < heartbeat_interval < fence_after < stale_after, got "
                f"{timing.heartbeat_interval}, {timing.fence_after}, {timing.stale_after}"
            )
        return timing


@dataclass(frozen=True)
class Claimed:
    """What ClaimRun answered, and when (monotonic) the claim was sent."""

    run: Run
    lease_epoch: int
    resumed: bool
    sent_at: float


class Lease:
    """The lease on one run; use it as a context manager.

    Inside the ``with`` block a thread heartbeats the run. The worker's loop
    checks ``cancel_requested`` and ``lost`` (or simply iterates
    :meth:`jobs`, which stops on either), reports results with
    :meth:`report` and ends the run with :meth:`finish`.
    """

    def __init__(
        self,
        transport: Transport,
        claimed: Claimed,
        *,
        stale_after: float | None,
        heartbeat_interval: float | None,
        fence_after: float | None,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = claimed.run
        self.lease_epoch = claimed.lease_epoch
        self.resumed = claimed.resumed
        self.cancel_requested = threading.Event()
        """Set once a cancel of the run was requested: stop taking jobs, finish CANCELLED."""
        self.lost = threading.Event()
        """Set once the lease is lost or fenced itself: stop working on the run now."""
        self.lost_reason = ""
        self._transport = transport
        self._retry = retry
        self._clock = clock
        self._claim = claimed
        self._options = (heartbeat_interval, fence_after)
        self.timing: LeaseTiming | None = (
            LeaseTiming.derive(
                stale_after, heartbeat_interval=heartbeat_interval, fence_after=fence_after
            )
            if stale_after is not None
            else None
        )
        self._lock = threading.Lock()
        self._last_ack_sent = claimed.sent_at
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        if claimed.run.cancel_requested:
            self.cancel_requested.set()

    # --- state -------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.run.id

    def fence_deadline(self) -> float:
        """The monotonic time after which this lease fences itself."""
        if self.timing is None:
            return float("inf")
        with self._lock:
            return self._last_ack_sent + self.timing.fence_after

    def _acknowledged(self, sent_at: float) -> None:
        with self._lock:
            self._last_ack_sent = max(self._last_ack_sent, sent_at)

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost.is_set():
                return
            self.lost_reason = reason
            self.lost.set()
        self._stop.set()
        log.warning("lease lost", extra={"run_id": self.run_id, "reason": reason})

    def is_lost(self) -> bool:
        """True once the lease is lost, including when its fencing budget ran out just now."""
        if not self.lost.is_set() and self.timing and self._clock() >= self.fence_deadline():
            self._lose("no heartbeat acknowledged within the fencing budget")
        return self.lost.is_set()

    def should_stop(self) -> bool:
        return self.is_lost() or self.cancel_requested.is_set()

    # --- calls ---------------------------------------------------------------------

    def _call_timeout(self) -> float:
        if self.lost.is_set():
            return self._transport.timeout
        remaining = self.fence_deadline() - self._clock()
        return max(MIN_CALL_TIMEOUT, min(self._transport.timeout, remaining))

    def _fenced_call(self, method: str, request: object, *, retry: RetryPolicy) -> object:
        """A lease call; its success counts as a heartbeat, a lost-lease answer loses it."""
        sent = self._clock()
        try:
            response = self._transport.call(
                method, request, retry=retry, timeout=self._call_timeout(), stop=self._stop
            )
        except LeaseLost as error:
            self._lose(f"{method}: {error.message}")
            raise
        except _LOSING_ERRORS as error:
            self._lose(f"{method}: {error}")
            raise LeaseLost(error.message, reason=error.reason, metadata=error.metadata) from error
        # With retries, the last try was sent later than ``sent``: using the
        # first send time only makes the budget shorter, never longer.
        self._acknowledged(sent)
        return response

    def heartbeat(self) -> bool:
        """One heartbeat now; True when acknowledged. Raises LeaseLost when the lease is gone."""
        if self.is_lost():
            raise LeaseLost(self.lost_reason)
        request = pb.HeartbeatRequest(run_id=self.run_id, lease_epoch=self.lease_epoch)
        try:
            response = self._fenced_call("Heartbeat", request, retry=NO_RETRY)
        except LeaseLost:
            raise
        except RunsvcError as error:
            log.info("heartbeat failed", extra={"run_id": self.run_id, "error": str(error)})
            return False
        assert isinstance(response, pb.HeartbeatResponse)
        if self.timing is None:
            self._learn_timing(response, received=self._clock())
        if response.cancel_requested and not self.cancel_requested.is_set():
            log.info("cancel requested", extra={"run_id": self.run_id})
            self.cancel_requested.set()
        return True

    def _learn_timing(self, response: pb.HeartbeatResponse, *, received: float) -> None:
        stale_time = response.stale_time.ToDatetime(tzinfo=UTC)
        anchor = self._claim.run.last_heartbeat_time
        if anchor is not None:
            elapsed = received - self._claim.sent_at
            estimate = (stale_time - anchor).total_seconds() - elapsed
        else:
            estimate = (stale_time - datetime.now(UTC)).total_seconds()
        if estimate <= 0:
            self._lose("cannot tell the server's stale threshold; pass stale_after")
            return
        interval, fence = self._options
        self.timing = LeaseTiming.derive(estimate, heartbeat_interval=interval, fence_after=fence)
        log.info(
            "lease timing",
            extra={
                "run_id": self.run_id,
                "stale_after": round(self.timing.stale_after, 3),
                "heartbeat_interval": round(self.timing.heartbeat_interval, 3),
                "fence_after": round(self.timing.fence_after, 3),
            },
        )

    def acquire(self, max_jobs: int, *, request_id: str | None = None) -> tuple[list[Job], int]:
        """Up to ``max_jobs`` jobs, now in progress, and the tenant's free slots left.

        The jobs a call took hold the tenant's slots until they are reported
        or the run ends, even when its answer was lost: retries of this call
        carry one ``request_id`` (new when not given), so that a retry hands
        out the jobs the lost answer carried instead of taking others. After
        a call that failed, pass its ``request_id`` again.
        """
        if self.is_lost():
            raise LeaseLost(self.lost_reason)
        request = pb.AcquireJobsRequest(
            run_id=self.run_id,
            lease_epoch=self.lease_epoch,
            max_jobs=max_jobs,
            request_id=request_id or uuid.uuid4().hex,
        )
        response = self._fenced_call("AcquireJobs", request, retry=self._retry)
        assert isinstance(response, pb.AcquireJobsResponse)
        return [Job.from_proto(j) for j in response.jobs], response.free_slots

    def jobs(self, *, batch_size: int = 10, idle_wait: float = 0.5) -> Iterator[Job]:
        """Jobs to run, acquired ``batch_size`` at a time.

        Stops when every job was handed out, a cancel is requested or the
        lease is lost. While the tenant has no free slot it waits
        ``idle_wait`` seconds between tries; while the service cannot be
        reached it keeps trying until the lease fences itself.
        """
        # One request id until a call hands out jobs: a call that failed, or
        # answered none, may still have taken jobs that commit later.
        request_id = uuid.uuid4().hex
        while not self.should_stop():
            try:
                batch, free = self.acquire(batch_size, request_id=request_id)
            except LeaseLost:
                return
            except _TRANSIENT_ERRORS:
                self._stop.wait(idle_wait)
                continue
            if batch:
                request_id = uuid.uuid4().hex
                for job in batch:
                    if self.should_stop():
                        return
                    yield job
                continue
            if free > 0:
                # No queued job is left, or the server holds back jobs
                # because a cancel was requested: a heartbeat tells which.
                with contextlib.suppress(LeaseLost):
                    self.heartbeat()
                return
            self._stop.wait(idle_wait)

    def report(self, results: Iterable[JobResult]) -> Reported:
        """Records job results (retry-safe).

        Works after the lease is lost too: the server keeps a result that
        really happened (marked late) and answers LeaseLost.
        """
        request = pb.ReportJobsRequest(
            run_id=self.run_id,
            lease_epoch=self.lease_epoch,
            results=[r.to_proto() for r in results],
        )
        response = self._fenced_call("ReportJobs", request, retry=self._retry)
        assert isinstance(response, pb.ReportJobsResponse)
        return Reported(recorded=response.recorded, duplicates=response.duplicates)

    def finish(self, outcome: RunOutcome | None = None, *, error: str = "") -> Run:
        """Ends the run (retry-safe) and stops heartbeating.

        Without ``outcome``: CANCELLED when a cancel was requested, else
        COMPLETED. Raises LeaseLost, without calling the server, once the
        lease is lost.
        """
        if self.is_lost():
            raise LeaseLost(self.lost_reason)
        if outcome is None:
            outcome = (
                RunOutcome.CANCELLED if self.cancel_requested.is_set() else RunOutcome.COMPLETED
            )
        request = pb.FinishRunRequest(
            run_id=self.run_id, lease_epoch=self.lease_epoch, outcome=outcome.value, error=error
        )
        response = self._fenced_call("FinishRun", request, retry=self._retry)
        assert isinstance(response, pb.FinishRunResponse)
        self._finished = True
        self._stop.set()
        self.run = Run.from_proto(response.run)
        return self.run

    # --- the heartbeat thread --------------------------------------------------------

    def _next_interval(self) -> float:
        assert self.timing is not None
        return self.timing.heartbeat_interval * (1 - random.uniform(0, JITTER))

    def _heartbeat_loop(self) -> None:
        failures = 0
        with self._lock:
            due = self._last_ack_sent + self._next_interval()
        while not self._stop.is_set():
            if self.is_lost():
                return
            wait = min(due, self.fence_deadline()) - self._clock()
            if wait > 0:
                self._stop.wait(wait)
                continue
            sent = self._clock()
            try:
                acknowledged = self.heartbeat()
            except LeaseLost:
                return
            if acknowledged:
                failures = 0
                due = sent + self._next_interval()
            else:
                due = self._clock() + self._retry.backoff(failures)
                failures += 1

    def __enter__(self) -> Lease:
        if self._thread is not None:
            raise RuntimeError("a lease is entered once")
        # The first heartbeat is synchronous: it learns the threshold and
        # whether a cancel is already pending before any job is taken.
        acknowledged = False
        for attempt in range(self._retry.attempts):
            try:
                acknowledged = self.heartbeat()
            except LeaseLost:
                return self
            if acknowledged or self._stop.wait(self._retry.backoff(attempt)):
                break
        if not acknowledged and self.timing is None:
            self._lose("the first heartbeat failed and the stale threshold is unknown")
            return self
        if not self.lost.is_set():
            self._thread = threading.Thread(
                target=self._heartbeat_loop, name=f"heartbeat-{self.run_id}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stops heartbeating (without finishing the run)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._transport.timeout + 1)
