"""The chart's alert rules, as rendered: `promtool check rules`, then `promtool test rules` with the unit
tests in tests/alerts/ (every alert firing and not firing). promtool comes from Debian's prometheus
package (scripts/install-prometheus.sh); helm as in tests/test_helm_chart.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_helm_chart import CHART, _find_helm, _run_helm

UNIT_TESTS = Path(__file__).resolve().parent / "alerts" / "dispatcher.test.yaml"
ENABLED = {"metrics": {"prometheusRule": {"enabled": True}}}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("no promtool: run `bash scripts/install-prometheus.sh`")
    return path


def rendered_rule(values: dict[str, Any]) -> dict[str, Any]:
    helm = _find_helm()
    if helm is None:
        pytest.skip("no helm binary: run `bash .ci/install-helm.sh` or set $HELM")
    proc = _run_helm(helm, "template", values)
    assert proc.returncode == 0, proc.stderr
    rules = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PrometheusRule"]
    assert len(rules) == 1
    return rules[0]


def alert_names(spec: dict[str, Any]) -> set[str]:
    return {rule["alert"] for group in spec["groups"] for rule in group["rules"] if "alert" in rule}


def test_rules_check_and_every_alert_has_unit_tests_and_a_runbook(promtool: str, tmp_path: Path) -> None:
    spec = rendered_rule(ENABLED)["spec"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(spec))
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    names = alert_names(spec)
    assert len(names) == 9, names
    tested = {
        t["alertname"]
        for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    assert tested == names
    operations = (CHART.parents[2] / "docs" / "operations.md").read_text()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
                assert anchor == rule["alert"].lower()
                assert f"### {rule['alert']}\n" in operations, rule["alert"]
                assert rule["labels"]["severity"] in ("warning", "critical")


def test_alert_unit_tests_fire_and_stay_quiet(promtool: str, tmp_path: Path) -> None:
    spec = rendered_rule(ENABLED)["spec"]
    for group in spec["groups"]:  # annotations are checked above, not compared by the unit tests
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    run = subprocess.run(
        [promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_thresholds_come_from_the_values(promtool: str) -> None:
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "ttftObjective": "1.0",
                "ttftTarget": 0.995,
                "queueWaitSeconds": 15,
                "noWorkerFor": "3m",
                "labels": {"release": "prom"},
            }
        }
    }
    rule = rendered_rule(values)
    assert rule["metadata"]["labels"]["release"] == "prom"
    text = yaml.safe_dump(rule["spec"])
    assert 'le="1.0"' in text and "(1 - 0.995)" in text and "> 15" in text
    by_name = {r.get("alert"): r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert by_name["DispatcherModelWithoutWorkers"]["for"] == "3m"
