"""The monitoring files in deploy/: rules that promtool checks and tests, the Alertmanager
example amtool accepts, and a dashboard whose every query names a metric runsvc exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runsvc.clock import FakeClock
from runsvc.domain import LivenessPolicy
from runsvc.metrics.wiring import build_metrics
from runsvc.store.engine import Database, make_engine
from runsvc.store.schema import metadata
from tests import tools

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "runsvc.rules.yml"
RULE_TESTS = PROMETHEUS / "runsvc.rules.test.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "runsvc-dashboard.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

# Metric names in PromQL: ours, the gRPC server's, and our recording rules.
METRIC_NAME = re.compile(r"\b(?:runsvc[_:][a-z0-9_:]*[a-z0-9]|grpc_server_[a-z_]*[a-z])\b")

# The list: the seed's three alerts, then the service's own.
EXPECTED_ALERTS = {
    "RunsvcHeartbeatTooOld",
    "RunsvcRunsStuckRunning",
    "RunsvcRunLockedWithoutHeartbeat",
    "RunsvcDown",
    "RunsvcAbsent",
    "RunsvcStoreUnreachable",
    "RunsvcReaperStalled",
    "RunsvcSlotReleaseBacklogOld",
    "RunsvcGrpcErrorRatioHigh",
    "RunsvcReaperBreakerHeld",
}


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every family and sample name a fresh server's registry exposes."""
    url = f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'runsvc.db'}"
    engine = make_engine(url)
    metadata.create_all(engine)
    db = Database(engine)
    metrics = build_metrics(
        db=db, clock=FakeClock(), policy=LivenessPolicy(), reap_interval_seconds=5
    )
    metrics.grpc.preregister("runsvc.v1.RunService", ["GetRun"])
    text = generate_latest(metrics.registry).decode()
    db.dispose()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name, f"{family.name}_total"}
        names |= {sample.name for sample in family.samples}
    return names


def test_promtool_checks_the_rules() -> None:
    checked = tools.run("promtool", "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_promtool_rule_tests_pass() -> None:
    tested = tools.run("promtool", "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_promtool_rule_tests_can_fail(tmp_path: Path) -> None:
    # The tests above mean something: a changed threshold makes them fail.
    broken = RULES.read_text().replace("runsvc:runs_stale:max > 5", "runsvc:runs_stale:max > 6")
    (tmp_path / "runsvc.rules.yml").write_text(broken)
    (tmp_path / "runsvc.rules.test.yml").write_text(RULE_TESTS.read_text())
    tested = tools.run("promtool", "test", "rules", str(tmp_path / "runsvc.rules.test.yml"))
    assert tested.returncode != 0
    assert "RunsvcRunsStuckRunning" in tested.stdout + tested.stderr


def test_every_alert_has_a_firing_and_a_not_firing_case() -> None:
    cases: dict[str, set[bool]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    names = {rule["alert"] for rule in alerts()}
    assert names == EXPECTED_ALERTS
    for name in names:
        assert cases.get(name) == {True, False}, name


def test_every_alert_has_severity_summary_and_a_runbook_link() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alerts():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"], rule["alert"]
        link = notes["runbook_url"]
        assert link == f"docs/runbook.md#{rule['alert'].lower()}"
        assert link in notes["description"], rule["alert"]
        assert link.partition("#")[2] in anchors, f"no section {link} in the run book"


def test_rules_name_only_metrics_runsvc_exports(exported: set[str]) -> None:
    known = exported | recorded_names()
    for rule in rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            assert name in known, f"{rule.get('alert') or rule.get('record')}: {name}"


def test_store_gauges_are_never_summed() -> None:
    # Every replica exports the same store-derived values: sum() would count them twice.
    store_gauges = ("runsvc_runs", "runsvc_oldest", "runsvc_slot_release", "runsvc_store")
    for rule in rules():
        if any(name.startswith(store_gauges) for name in METRIC_NAME.findall(rule["expr"])):
            assert "sum" not in rule["expr"], rule["expr"]


def test_prometheus_example_config_is_valid() -> None:
    checked = tools.run("promtool", "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alertmanager_example_config_is_valid_and_routes_by_severity() -> None:
    checked = tools.run("amtool", "check-config", str(ALERTMANAGER))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for severity, receiver in (("critical", "runsvc-oncall"), ("warning", "runsvc-team")):
        routed = tools.run(
            "amtool",
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER}",
            f"severity={severity}",
            "alertname=RunsvcDown",
        )
        assert routed.returncode == 0, routed.stderr
        assert routed.stdout.strip() == receiver


def test_dashboard_queries_name_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported | recorded_names()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("runs by state", "stale", "heartbeat age", "reaper", "calls", "latency", "slot"):
        assert topic in titles, topic
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = METRIC_NAME.findall(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            for name in names:
                assert name in known, f"{panel['title']}: {name} is not exported"
