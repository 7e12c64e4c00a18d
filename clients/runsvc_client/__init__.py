"""Python clients for runsvc.

* :class:`WorkerClient` claims runs; its :class:`Lease` heartbeats in the
  background, learns of cancels, fences itself when it cannot reach the
  service, and hands out jobs.
* :class:`BackendClient` is the web backend's view: the active run, runs,
  create, cancel and force-cancel.
* ``runsvc_client.flask_blueprint`` (extra ``flask``) serves the UI's REST
  endpoints from a Flask app.
* ``runsvc_client.errors`` has one exception class per gRPC status code.
* Every client takes one target or a list of replica addresses and spreads
  its calls over them (:func:`balanced_channel`, ``round_robin``).

The generated messages and stubs are in ``runsvc_client.v1``.
"""

from runsvc_client.backend import BackendClient
from runsvc_client.balancing import balanced_channel, target_of
from runsvc_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    LeaseLost,
    NotFound,
    PermissionDenied,
    RunsvcError,
    Unavailable,
)
from runsvc_client.lease import Lease, LeaseTiming
from runsvc_client.models import (
    ForceCancelled,
    Job,
    JobCounts,
    JobResult,
    JobSpec,
    Reported,
    Run,
    RunOutcome,
    RunState,
)
from runsvc_client.retry import RetryPolicy
from runsvc_client.worker import WorkerClient

__all__ = [
    "AlreadyExists",
    "BackendClient",
    "FailedPrecondition",
    "ForceCancelled",
    "Job",
    "JobCounts",
    "JobResult",
    "JobSpec",
    "Lease",
    "LeaseLost",
    "LeaseTiming",
    "NotFound",
    "PermissionDenied",
    "Reported",
    "RetryPolicy",
    "Run",
    "RunOutcome",
    "RunState",
    "RunsvcError",
    "Unavailable",
    "WorkerClient",
    "balanced_channel",
    "target_of",
]
