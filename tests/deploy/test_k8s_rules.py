"""deploy/kubernetes/prometheusrule.yaml is what tools/gen_k8s_rules.py makes of the rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.deploy.k8s_manifests import ROOT

GENERATOR = ROOT / "tools" / "gen_k8s_rules.py"
RULES = ROOT / "deploy" / "prometheus" / "runsvc.rules.yml"
COMMITTED = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"


def generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_committed_manifest_is_what_the_generator_makes() -> None:
    checked = generator("--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_check_fails_with_a_diff_when_the_manifest_is_stale(tmp_path: Path) -> None:
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(COMMITTED.read_text().replace("> 120", "> 240", 1))
    checked = generator("--check", "--output", str(stale))
    assert checked.returncode == 1
    assert "-      expr: runsvc:oldest_heartbeat_age_seconds:max > 240" in checked.stdout
    assert "+      expr: runsvc:oldest_heartbeat_age_seconds:max > 120" in checked.stdout
    assert "make k8s-rules" in checked.stderr


def test_check_fails_when_the_rules_changed(tmp_path: Path) -> None:
    rules = tmp_path / "runsvc.rules.yml"
    rules.write_text(RULES.read_text().replace("for: 1m", "for: 3m", 1))
    assert generator("--check", "--source", str(rules)).returncode == 1


def test_generating_writes_the_groups_unchanged(tmp_path: Path) -> None:
    output = tmp_path / "prometheusrule.yaml"
    made = generator("--output", str(output))
    assert made.returncode == 0, made.stderr
    assert output.read_text() == COMMITTED.read_text()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert yaml.safe_load(output.read_text())["spec"]["groups"] == groups


def test_a_rules_file_with_more_than_groups_is_refused(tmp_path: Path) -> None:
    rules = tmp_path / "runsvc.rules.yml"
    rules.write_text(RULES.read_text() + "extra: 1\n")
    refused = generator("--source", str(rules), "--output", str(tmp_path / "out.yaml"))
    assert refused.returncode != 0
    assert "one key, `groups`" in refused.stderr
    assert not (tmp_path / "out.yaml").exists()
