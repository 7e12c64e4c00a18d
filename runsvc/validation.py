"""Input checks, run before any write; every problem is reported at once."""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from runsvc.domain import JobResult, JobSpec
from runsvc.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class Limits:
    max_jobs_per_run: int = 10_000
    max_payload_bytes: int = 64 * 1024
    max_id_length: int = 128
    max_external_id_length: int = 256
    max_text_length: int = 1024
    max_jobs_per_acquire: int = 1_000
    max_results_per_report: int = 1_000
    max_page_size: int = 500
    default_page_size: int = 50


class Checker:
    """Collects field violations; ``done()`` raises them together."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def identifier(self, field: str, value: str, *, max_length: int) -> None:
        if not value:
            self.fail(field, "must not be empty")
        elif len(value) > max_length:
            self.fail(field, f"must be at most {max_length} characters")
        elif not value.isprintable():
            self.fail(field, "must contain only printable characters")

    def object_id(self, field: str, value: str) -> None:
        try:
            if str(uuid.UUID(value)) == value:
                return
        except ValueError:
            pass
        self.fail(field, "must be an id issued by runsvc (a lowercase UUID)")

    def text(self, field: str, value: str, *, max_length: int) -> None:
        """Free text (a reason, an error): any length up to the limit, no control character.

        NUL cannot be stored by PostgreSQL, and the other control characters
        (newlines included) would let a caller forge lines in a log or a terminal.
        """
        if len(value) > max_length:
            self.fail(field, f"must be at most {max_length} characters")
        elif any(unicodedata.category(c) == "Cc" for c in value):
            self.fail(field, "must not contain control characters (NUL, newlines, escapes)")

    def count(self, field: str, value: int, *, low: int, high: int) -> None:
        if not low <= value <= high:
            self.fail(field, f"must be between {low} and {high}")

    def lease_epoch(self, field: str, value: int) -> None:
        if value < 1:
            self.fail(field, "must be the lease epoch returned by ClaimRun")

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)


def check_jobs(check: Checker, specs: Sequence[JobSpec], limits: Limits) -> None:
    if not specs:
        check.fail("jobs", "a run needs at least one job")
    elif len(specs) > limits.max_jobs_per_run:
        check.fail("jobs", f"at most {limits.max_jobs_per_run} jobs per run")
        return
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        check.identifier(
            f"jobs[{i}].external_id", spec.external_id, max_length=limits.max_external_id_length
        )
        if spec.external_id in seen:
            check.fail(f"jobs[{i}].external_id", "must be unique within the run")
        seen.add(spec.external_id)
        if len(spec.payload) > limits.max_payload_bytes:
            check.fail(f"jobs[{i}].payload", f"must be at most {limits.max_payload_bytes} bytes")


def check_results(check: Checker, results: Sequence[JobResult], limits: Limits) -> None:
    if not results:
        check.fail("results", "must not be empty")
    elif len(results) > limits.max_results_per_report:
        check.fail("results", f"at most {limits.max_results_per_report} results per call")
        return
    seen: set[str] = set()
    for i, result in enumerate(results):
        check.object_id(f"results[{i}].job_id", result.job_id)
        if result.job_id in seen:
            check.fail(f"results[{i}].job_id", "must appear once per call")
        seen.add(result.job_id)
        check.text(f"results[{i}].error", result.error or "", max_length=limits.max_text_length)
