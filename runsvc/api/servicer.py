"""The RunService servicer: thin. Each method converts, calls one use case, converts back.

Domain errors become status codes in :func:`_edge`, through the one table in
:mod:`runsvc.api.status`; anything unexpected is logged and answered INTERNAL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from runsvc.api import convert
from runsvc.api.auth import SERVICE, caller_of, current_principal, required_tenant, tenant_scope
from runsvc.api.status import to_status
from runsvc.errors import PermissionDenied, RunNotVisible, RunsvcError
from runsvc.service import Caller, RunService
from runsvc.service.security import SecurityAudit
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

R = TypeVar("R")
Method = Callable[[Any, Any, grpc.ServicerContext], R]


def _edge(method: Method[R]) -> Method[R]:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except RunsvcError as error:
            if isinstance(error, PermissionDenied) and not isinstance(error, RunNotVisible):
                # RunNotVisible was audited by the use case, with the run id.
                self._audit_denial(method.__name__)
            context.abort_with_status(to_status(error))
            raise  # pragma: no cover - abort_with_status raises
        except Exception:
            log.exception("unexpected error", extra={"method": method.__name__})
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise  # pragma: no cover

    return wrapper


def _caller() -> Caller:
    return caller_of(current_principal())


class RunServiceServicer(pb_grpc.RunServiceServicer):
    def __init__(self, service: RunService, *, audit: SecurityAudit | None = None) -> None:
        self._worker = service.worker
        self._backend = service.backend
        self._audit = audit

    def _audit_denial(self, method: str) -> None:
        if self._audit is not None:
            principal = current_principal()
            self._audit.denied(
                action="PERMISSION_DENIED",
                caller=caller_of(principal),
                tenant_id=principal.tenant_id,
                method=f"/{SERVICE}/{method}",
            )

    # --- the web backend and operators ---------------------------------

    @_edge
    def CreateRun(self, request: pb.CreateRunRequest, context: Any) -> pb.CreateRunResponse:
        run = self._backend.create_run(
            tenant_id=required_tenant(current_principal(), request.tenant_id),
            request_id=request.request_id,
            jobs=convert.job_specs(request.jobs),
            caller=_caller(),
        )
        return pb.CreateRunResponse(run=convert.run_to_proto(run))

    @_edge
    def GetActive(self, request: pb.GetActiveRequest, context: Any) -> pb.GetActiveResponse:
        run = self._backend.get_active(
            tenant_id=required_tenant(current_principal(), request.tenant_id), caller=_caller()
        )
        return pb.GetActiveResponse(run=convert.run_to_proto(run))

    @_edge
    def GetRun(self, request: pb.GetRunRequest, context: Any) -> pb.GetRunResponse:
        run = self._backend.get_run(
            tenant_id=tenant_scope(current_principal(), ""),
            run_id=request.run_id,
            caller=_caller(),
        )
        return pb.GetRunResponse(run=convert.run_to_proto(run))

    @_edge
    def ListRuns(self, request: pb.ListRunsRequest, context: Any) -> pb.ListRunsResponse:
        page = self._backend.list_runs(
            tenant_id=tenant_scope(current_principal(), request.tenant_id),
            states=convert.run_states(request.states),
            page_size=request.page_size,
            page_token=request.page_token,
            caller=_caller(),
        )
        return pb.ListRunsResponse(
            runs=[convert.run_to_proto(r) for r in page.runs],
            next_page_token=page.next_page_token,
        )

    @_edge
    def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        run = self._backend.cancel(
            tenant_id=tenant_scope(current_principal(), ""),
            run_id=request.run_id,
            reason=request.reason,
            caller=_caller(),
        )
        return pb.CancelResponse(run=convert.run_to_proto(run))

    @_edge
    def ForceCancel(self, request: pb.ForceCancelRequest, context: Any) -> pb.ForceCancelResponse:
        done = self._backend.force_cancel(
            tenant_id=tenant_scope(current_principal(), ""),
            run_id=request.run_id,
            reason=request.reason,
            caller=_caller(),
        )
        return pb.ForceCancelResponse(
            run=convert.run_to_proto(done.run),
            cancelled_jobs=done.cancelled_jobs,
            released_slots=done.released_slots,
            pending_slot_releases=done.pending_slot_releases,
        )

    # --- workers -------------------------------------------------------

    @_edge
    def ClaimRun(self, request: pb.ClaimRunRequest, context: Any) -> pb.ClaimRunResponse:
        claim = self._worker.claim_run(
            tenant_id=tenant_scope(current_principal(), ""),
            worker_id=request.worker_id,
            caller=_caller(),
        )
        if claim is None:
            return pb.ClaimRunResponse()
        return pb.ClaimRunResponse(
            run=convert.run_to_proto(claim.run),
            lease_epoch=claim.lease_epoch,
            resumed=claim.resumed,
        )

    @_edge
    def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        ack = self._worker.heartbeat(
            tenant_id=tenant_scope(current_principal(), ""),
            run_id=request.run_id,
            lease_epoch=request.lease_epoch,
            caller=_caller(),
        )
        stale_time = convert.timestamp(ack.stale_time)
        return pb.HeartbeatResponse(cancel_requested=ack.cancel_requested, stale_time=stale_time)

    @_edge
    def AcquireJobs(self, request: pb.AcquireJobsRequest, context: Any) -> pb.AcquireJobsResponse:
        acquired = self._worker.acquire_jobs(
            tenant_id=tenant_scope(current_principal(), ""),
            run_id=request.run_id,
            lease_epoch=request.lease_epoch,
            max_jobs=request.max_jobs,
            request_id=request.request_id,
            caller=_caller(),
        )
        return pb.AcquireJobsResponse(
            jobs=[convert.job_to_proto(j) for j in acquired.jobs], free_slots=acquired.free_slots
        )

    @_edge
    def ReportJobs(self, request: pb.ReportJobsRequest, context: Any) -> pb.ReportJobsResponse:
        reported = self._worker.report_jobs(
            tenant_id=tenant_scope(current_principal(), ""),
            run_id=request.run_id,
            lease_epoch=request.lease_epoch,
            results=convert.job_results(request.results),
            caller=_caller(),
        )
        return pb.ReportJobsResponse(recorded=reported.recorded, duplicates=reported.duplicates)

    @_edge
    def FinishRun(self, request: pb.FinishRunRequest, context: Any) -> pb.FinishRunResponse:
        run = self._worker.finish_run(
            tenant_id=tenant_scope(current_principal(), ""),
            run_id=request.run_id,
            lease_epoch=request.lease_epoch,
            outcome=convert.run_outcome(request.outcome),
            error=request.error,
            caller=_caller(),
        )
        return pb.FinishRunResponse(run=convert.run_to_proto(run))
