"""The worker's client: claim a run (or resume the one this worker holds)."""

from __future__ import annotations

import time
from types import TracebackType

import grpc

from runsvc_client._transport import TokenSource, Transport
from runsvc_client.balancing import Target
from runsvc_client.lease import Claimed, Lease
from runsvc_client.models import Run
from runsvc_client.retry import RetryPolicy
from runsvc_client.v1 import run_service_pb2 as pb

DEFAULT_TIMEOUT = 5.0
"""Seconds per call at most; lease calls also end by the fencing deadline."""


class WorkerClient:
    """Claims runs for one worker identity.

    ``worker_id`` must stay the same across restarts of the same worker: a
    restarted worker then gets its running run back (a new lease epoch).

    ``stale_after`` is the server's stale threshold (``RUNSVC_STALE_AFTER_SECONDS``);
    when None, each lease learns it from its first heartbeat. The heartbeat
    interval defaults to a third of it and the self-fencing budget to two
    thirds; ``heartbeat_interval`` and ``fence_after`` override them.
    """

    def __init__(
        self,
        target: Target | grpc.Channel,
        *,
        token: TokenSource,
        worker_id: str,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        stale_after: float | None = None,
        heartbeat_interval: float | None = None,
        fence_after: float | None = None,
    ) -> None:
        if not worker_id:
            raise ValueError("worker_id is required")
        self.worker_id = worker_id
        self._transport = Transport(target, token=token, timeout=timeout)
        self._retry = retry or RetryPolicy()
        self._stale_after = stale_after
        self._heartbeat_interval = heartbeat_interval
        self._fence_after = fence_after

    def claim(self) -> Lease | None:
        """A lease on the oldest pending run (or on the run this worker holds); None if idle.

        Retried on transient failures: a repeated claim by the same worker
        resumes the run the lost answer gave it.
        """
        sent = time.monotonic()
        response = self._transport.call(
            "ClaimRun", pb.ClaimRunRequest(worker_id=self.worker_id), retry=self._retry
        )
        assert isinstance(response, pb.ClaimRunResponse)
        if not response.HasField("run"):
            return None
        claimed = Claimed(
            run=Run.from_proto(response.run),
            lease_epoch=response.lease_epoch,
            resumed=response.resumed,
            sent_at=sent,
        )
        return Lease(
            self._transport,
            claimed,
            stale_after=self._stale_after,
            heartbeat_interval=self._heartbeat_interval,
            fence_after=self._fence_after,
            retry=self._retry,
        )

    def close(self) -> None:
        """Closes the channel if this client opened it."""
        self._transport.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
