"""The SLO alerts and the cost recording rules, evaluated by Prometheus's own rule engine.

`promtool test rules` runs kuberay/monitoring/rules-test.yaml: series as Ray's exporter names them
go in, and the recorded values and the alerts that fire (or do not) at given times must be the
ones the file expects: a fast burn pages and a short blip does not, the first-token page fires
above 14.4 x its 5 % budget, tenants' and features' GPU-seconds add up to their tier's total.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import monitoring, prometheus


@pytest.fixture(scope="module")
def promtool() -> None:
    reason = prometheus.install()
    if reason is not None:
        pytest.skip(f"no promtool to test the rules with: {reason}")


def without_annotations(groups: dict[str, Any]) -> dict[str, Any]:
    """The rule groups as promtool's cases expect their alerts: labels only (the annotations are
    checked by tests/unit/test_monitoring.py; these cases are about when alerts fire)."""
    groups = copy.deepcopy(groups)
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return groups


def test_promtool_rule_cases_pass(promtool: None, tmp_path: Path) -> None:
    cases = yaml.safe_load(monitoring.RULE_TESTS.read_text())
    assert cases["rule_files"] == ["rules.yaml"]
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump(without_annotations(monitoring.rule_groups()))
    )
    shutil.copy(monitoring.RULE_TESTS, tmp_path / monitoring.RULE_TESTS.name)
    done = subprocess.run(
        ["promtool", "test", "rules", monitoring.RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_a_wrong_expectation_fails(promtool: None, tmp_path: Path) -> None:
    """The cases can fail: the fast burn expected for the blip's tier too is reported missing."""
    cases = yaml.safe_load(monitoring.RULE_TESTS.read_text())
    fast = next(
        t
        for t in cases["tests"][0]["alert_rule_test"]
        if t["alertname"] == "TierAvailabilityFastBurn" and t["exp_alerts"]
    )
    fast["exp_alerts"].append({"exp_labels": {"severity": "critical", "tier": "small"}})
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump(without_annotations(monitoring.rule_groups()))
    )
    (tmp_path / "cases.yaml").write_text(yaml.safe_dump(cases))
    done = subprocess.run(
        ["promtool", "test", "rules", "cases.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "TierAvailabilityFastBurn" in done.stdout + done.stderr
