"""Input checks: every problem is reported at once, under the right field name."""

from __future__ import annotations

import uuid

import pytest

from runsvc.domain import JobOutcome, JobResult, JobSpec
from runsvc.errors import InvalidArgument
from runsvc.validation import Checker, Limits, check_jobs, check_results

SMALL = Limits(
    max_jobs_per_run=3,
    max_payload_bytes=4,
    max_external_id_length=5,
    max_text_length=6,
    max_results_per_report=3,
)


def fields(check: Checker) -> list[str]:
    return [v.field for v in check.violations]


def job_id() -> str:
    return str(uuid.uuid4())


# --- Checker ------------------------------------------------------------------------------


def test_a_clean_checker_passes() -> None:
    check = Checker()
    check.identifier("request_id", "req-1", max_length=10)
    check.object_id("run_id", job_id())
    check.text("reason", "ok", max_length=10)
    check.count("page_size", 10, low=1, high=10)
    check.lease_epoch("lease_epoch", 1)
    assert check.violations == []
    check.done()


@pytest.mark.parametrize(
    ("value", "description"),
    [
        ("", "must not be empty"),
        ("x" * 11, "must be at most 10 characters"),
        ("tab\there", "must contain only printable characters"),
        ("line\n", "must contain only printable characters"),
    ],
)
def test_identifier(value: str, description: str) -> None:
    check = Checker()
    check.identifier("request_id", value, max_length=10)
    assert [(v.field, v.description) for v in check.violations] == [("request_id", description)]


def test_identifier_at_the_limit_passes() -> None:
    check = Checker()
    check.identifier("request_id", "x" * 10, max_length=10)
    assert check.violations == []


@pytest.mark.parametrize(
    "value",
    ["", "not-a-uuid", str(uuid.uuid4()).upper(), uuid.uuid4().hex, "{" + str(uuid.uuid4()) + "}"],
)
def test_object_id_needs_a_lowercase_canonical_uuid(value: str) -> None:
    check = Checker()
    check.object_id("run_id", value)
    assert fields(check) == ["run_id"]


def test_text_and_count_and_lease_epoch() -> None:
    check = Checker()
    check.text("reason", "x" * 7, max_length=6)
    check.text("note", "x" * 6, max_length=6)
    check.count("page_size", 0, low=1, high=500)
    check.count("max_jobs", 501, low=1, high=500)
    check.count("free", 500, low=1, high=500)
    check.lease_epoch("lease_epoch", 0)
    check.lease_epoch("epoch_ok", 2)
    assert fields(check) == ["reason", "page_size", "max_jobs", "lease_epoch"]


def test_done_raises_every_violation_together() -> None:
    check = Checker()
    check.identifier("a", "", max_length=3)
    check.object_id("b", "nope")
    check.fail("c", "is wrong")
    with pytest.raises(InvalidArgument) as raised:
        check.done()
    assert [v.field for v in raised.value.violations] == ["a", "b", "c"]
    assert raised.value.violations[2].description == "is wrong"


# --- check_jobs -----------------------------------------------------------------------------


def test_valid_jobs_pass() -> None:
    check = Checker()
    check_jobs(check, [JobSpec("a", b"1234"), JobSpec("bbbbb", b"")], SMALL)
    assert check.violations == []


def test_no_jobs() -> None:
    check = Checker()
    check_jobs(check, [], SMALL)
    assert fields(check) == ["jobs"]


def test_too_many_jobs_reports_only_the_count() -> None:
    check = Checker()
    check_jobs(check, [JobSpec("", b"too long") for _ in range(4)], SMALL)
    assert [(v.field, v.description) for v in check.violations] == [
        ("jobs", "at most 3 jobs per run")
    ]


def test_job_problems_are_named_by_index() -> None:
    check = Checker()
    check_jobs(check, [JobSpec("a", b"ok"), JobSpec("", b"12345"), JobSpec("a", b"")], SMALL)
    assert fields(check) == ["jobs[1].external_id", "jobs[1].payload", "jobs[2].external_id"]
    assert check.violations[2].description == "must be unique within the run"


def test_job_external_id_length_and_printability() -> None:
    check = Checker()
    check_jobs(check, [JobSpec("toolong", b""), JobSpec("a\x00", b"")], SMALL)
    assert fields(check) == ["jobs[0].external_id", "jobs[1].external_id"]


# --- check_results --------------------------------------------------------------------------


def test_valid_results_pass() -> None:
    check = Checker()
    check_results(
        check,
        [
            JobResult(job_id(), JobOutcome.COMPLETED),
            JobResult(job_id(), JobOutcome.FAILED, error="busy"),
        ],
        SMALL,
    )
    assert check.violations == []


def test_no_results() -> None:
    check = Checker()
    check_results(check, [], SMALL)
    assert fields(check) == ["results"]


def test_too_many_results_reports_only_the_count() -> None:
    check = Checker()
    check_results(check, [JobResult("bad", JobOutcome.COMPLETED) for _ in range(4)], SMALL)
    assert [(v.field, v.description) for v in check.violations] == [
        ("results", "at most 3 results per call")
    ]


def test_result_problems_are_named_by_index() -> None:
    same = job_id()
    check = Checker()
    check_results(
        check,
        [
            JobResult(same, JobOutcome.COMPLETED),
            JobResult("not-an-id", JobOutcome.FAILED, error="x" * 7),
            JobResult(same, JobOutcome.FAILED, error="x" * 6),
        ],
        SMALL,
    )
    assert fields(check) == ["results[1].job_id", "results[1].error", "results[2].job_id"]
    assert check.violations[2].description == "must appear once per call"


def test_default_limits() -> None:
    limits = Limits()
    assert limits.max_jobs_per_run == 10_000
    assert limits.max_payload_bytes == 64 * 1024
    assert limits.max_results_per_report == 1_000
    assert limits.default_page_size <= limits.max_page_size
