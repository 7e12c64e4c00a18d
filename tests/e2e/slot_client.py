"""A small gRPC driver for slot tests: a tenant's backend and worker against one address."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from runsvc import tokens
from runsvc_client.v1 import run_service_pb2 as pb
from runsvc_client.v1 import run_service_pb2_grpc as pb_grpc

CALL_TIMEOUT = 10.0


@dataclass
class Tenant:
    stub: pb_grpc.RunServiceStub
    secret: str
    tenant: str

    def _meta(self, role: str) -> list[tuple[str, str]]:
        # Worker ids below are "slot-worker/<run>": the token's subject is their prefix.
        subject = "slot-worker" if role == "worker" else None
        issued = tokens.issue(
            self.secret, role=role, tenant_id=self.tenant, ttl_seconds=600, subject=subject
        )
        return [("authorization", f"Bearer {issued}")]

    def backend(self, rpc: str, request: object, *, timeout: float = CALL_TIMEOUT) -> object:
        return getattr(self.stub, rpc)(request, metadata=self._meta("backend"), timeout=timeout)

    def worker(self, rpc: str, request: object, *, timeout: float = CALL_TIMEOUT) -> object:
        return getattr(self.stub, rpc)(request, metadata=self._meta("worker"), timeout=timeout)

    def start_run(self, request_id: str, jobs: int) -> tuple[str, int]:
        self.backend(
            "CreateRun",
            pb.CreateRunRequest(
                request_id=request_id,
                jobs=[pb.JobSpec(external_id=f"j{i}", payload=b"x") for i in range(jobs)],
            ),
        )
        claim = self.worker("ClaimRun", pb.ClaimRunRequest(worker_id=f"slot-worker/{request_id}"))
        assert isinstance(claim, pb.ClaimRunResponse)
        return claim.run.id, claim.lease_epoch

    def acquire(self, run_id: str, epoch: int, n: int) -> list[str]:
        reply = self.worker(
            "AcquireJobs", pb.AcquireJobsRequest(run_id=run_id, lease_epoch=epoch, max_jobs=n)
        )
        assert isinstance(reply, pb.AcquireJobsResponse)
        return [job.id for job in reply.jobs]

    def report(self, run_id: str, epoch: int, job_ids: list[str]) -> None:
        self.worker(
            "ReportJobs",
            pb.ReportJobsRequest(
                run_id=run_id,
                lease_epoch=epoch,
                results=[pb.JobResult(job_id=j, outcome=pb.JOB_OUTCOME_COMPLETED) for j in job_ids],
            ),
        )

    def force_cancel(self, run_id: str, *, timeout: float) -> pb.ForceCancelResponse:
        reply = self.backend(
            "ForceCancel", pb.ForceCancelRequest(run_id=run_id, reason="dead"), timeout=timeout
        )
        assert isinstance(reply, pb.ForceCancelResponse)
        return reply


def tenant(channel: grpc.Channel, secret: str, name: str) -> Tenant:
    return Tenant(pb_grpc.RunServiceStub(channel), secret, name)
