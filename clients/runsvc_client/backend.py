"""The web backend's client: the tenant's active run, its runs, create and cancel."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import TracebackType

import grpc

from runsvc_client._transport import TokenSource, Transport
from runsvc_client.balancing import Target
from runsvc_client.errors import NotFound
from runsvc_client.models import ForceCancelled, JobSpec, Run, RunState
from runsvc_client.retry import NO_RETRY, RetryPolicy
from runsvc_client.v1 import run_service_pb2 as pb

DEFAULT_TIMEOUT = 5.0
"""Seconds per attempt; every call of this client has a deadline."""


class BackendClient:
    """Calls runsvc as the web backend of one tenant (the tenant comes from the token).

    Every call has a deadline (``timeout`` seconds per attempt). Transient
    failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with ``retry`` for
    the calls that are safe to repeat: the reads, ``create_run`` (idempotent
    on its ``request_id``) and ``cancel``. ``force_cancel`` is not retried:
    a repeat after a lost answer would succeed but report 0 cancelled jobs,
    hiding the count; call it again yourself if you need to.

    Refusals raise :mod:`runsvc_client.errors` exceptions.
    """

    def __init__(
        self,
        target: Target | grpc.Channel,
        *,
        token: TokenSource,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._transport = Transport(target, token=token, timeout=timeout)
        self._retry = retry or RetryPolicy()

    def get_active(self, *, tenant_id: str = "") -> Run | None:
        """The tenant's pending or running run, or None when it has none.

        ``tenant_id`` names the tenant (an admin must; any other token may name only its own).
        """
        try:
            response = self._transport.call(
                "GetActive", pb.GetActiveRequest(tenant_id=tenant_id), retry=self._retry
            )
        except NotFound:
            return None
        return Run.from_proto(response.run)

    def get_run(self, run_id: str) -> Run:
        """One run; PermissionDenied when it does not exist or is another tenant's."""
        response = self._transport.call(
            "GetRun", pb.GetRunRequest(run_id=run_id), retry=self._retry
        )
        return Run.from_proto(response.run)

    def list_runs(self, *, states: Iterable[RunState] = (), page_size: int = 100) -> Iterator[Run]:
        """The tenant's runs, newest first, fetching pages as the iteration goes."""
        wanted = [s.to_proto() for s in states]
        token = ""
        while True:
            response = self._transport.call(
                "ListRuns",
                pb.ListRunsRequest(page_size=page_size, page_token=token, states=wanted),
                retry=self._retry,
            )
            for run in response.runs:
                yield Run.from_proto(run)
            token = response.next_page_token
            if not token:
                return

    def create_run(self, jobs: Iterable[JobSpec], *, request_id: str) -> Run:
        """Creates a run; the same ``request_id`` returns the run it created.

        AlreadyExists (with ``.run_id``) while the tenant has an active run.
        """
        request = pb.CreateRunRequest(
            request_id=request_id,
            jobs=[pb.JobSpec(external_id=j.external_id, payload=j.payload) for j in jobs],
        )
        response = self._transport.call("CreateRun", request, retry=self._retry)
        return Run.from_proto(response.run)

    def cancel(self, run_id: str, *, reason: str = "") -> Run:
        """Asks the run's worker to stop; a pending run ends at once. Idempotent."""
        request = pb.CancelRequest(run_id=run_id, reason=reason)
        return Run.from_proto(self._transport.call("Cancel", request, retry=self._retry).run)

    def force_cancel(self, run_id: str, *, reason: str = "") -> ForceCancelled:
        """Ends the run now, even with a dead worker: jobs failed, slots released."""
        request = pb.ForceCancelRequest(run_id=run_id, reason=reason)
        response = self._transport.call("ForceCancel", request, retry=NO_RETRY)
        return ForceCancelled(
            run=Run.from_proto(response.run),
            cancelled_jobs=response.cancelled_jobs,
            released_slots=response.released_slots,
        )

    def close(self) -> None:
        """Closes the channel if this client opened it."""
        self._transport.close()

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
