"""The SLO alerts and the cost recording rules, evaluated by Prometheus's own rule engine.

`promtool test rules` runs kuberay/monitoring/rules-test.yaml: series as Ray's exporter names them
go in, and the recorded values and the alerts that fire (or do not) at given times must be the
ones the file expects: a fast burn pages and a short blip does not, the first-token page fires
above 14.4 x its 5 % budget, tenants' and features' GPU-seconds add up to their tier's total.
The dashboard's cost panels, which a stack without GPUs cannot fill, are read on the same series.
"""

from __future__ import annotations

import copy
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


def run_cases(workdir: Path, cases: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` on `cases`, the shipped rule groups as their rules.yaml."""
    assert cases["rule_files"] == ["rules.yaml"]
    rules = without_annotations(monitoring.rule_groups())
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
    (workdir / "cases.yaml").write_text(yaml.safe_dump(cases))
    return subprocess.run(
        ["promtool", "test", "rules", "cases.yaml"], cwd=workdir, capture_output=True, text=True
    )


def test_promtool_rule_cases_pass(promtool: None, tmp_path: Path) -> None:
    done = run_cases(tmp_path, yaml.safe_load(monitoring.RULE_TESTS.read_text()))
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
    done = run_cases(tmp_path, cases)
    assert done.returncode != 0
    assert "TierAvailabilityFastBurn" in done.stdout + done.stderr


def test_the_dashboards_cost_panels_on_the_cost_case(promtool: None, tmp_path: Path) -> None:
    """The cost panels' queries as Grafana sends them for tiers large and small over a 10-minute
    range, on the series of rules-test.yaml's cost case at 30 min (8 GPUs at 2.5 $ shared 2:1:1,
    and an idle GPU at 1 $)."""
    cases = yaml.safe_load(monitoring.RULE_TESTS.read_text())
    (cost,) = [case for case in cases["tests"] if "ray_serve_app_gpu_seconds_total" in str(case)]
    values = {**monitoring.GRAFANA_VALUES, "tier": "large|small"}
    panels = {
        q.name: q.expr
        for q in monitoring.panel_queries(monitoring.dashboard(), values)
        if q.optional_inputs
    }
    shares = [("team-a", "search"), ("team-a", "none"), ("team-b", "chat")]
    unattributed = ("(unattributed)", "(unattributed)")

    def samples(name: str, by_labels: dict[str, float]) -> list[dict[str, Any]]:
        return [{"labels": f"{name}{{{labels}}}", "value": v} for labels, v in by_labels.items()]

    def per_tenant(values: list[float]) -> dict[str, float]:
        return {
            f'tenant="{tenant}", feature="{feature}"': value
            for (tenant, feature), value in zip([*shares, unattributed], values, strict=True)
        }

    expected = {
        "GPUs held per tier (GPU-seconds per second) [A]": samples(
            "tier:serve_app_gpu_seconds:rate5m", {'tier="large"': 8, 'tier="small"': 1}
        ),
        "GPU cost per tier ($ per hour) [A]": samples(
            "tier:serve_app_gpu_usd_per_hour:rate5m", {'tier="large"': 20, 'tier="small"': 1}
        ),
        "GPUs held per tenant and feature (top 10) [A]": samples("", per_tenant([4, 2, 2, 1])),
        "GPU-seconds and dollars per tenant and feature over the range (top 10) [A]": samples(
            "", per_tenant([2400, 1200, 1200, 600])
        ),
    }
    dollars = "GPU-seconds and dollars per tenant and feature over the range (top 10) [B]"
    tests = [
        {"expr": panels[name], "eval_time": "30m", "exp_samples": expected[name]}
        for name in expected
    ]
    tests.append(  # dollars over the 10 minutes, times 6: 10, 5, 5 and 1 $ an hour
        {
            "expr": f"round(({panels[dollars]}) * 6)",
            "eval_time": "30m",
            "exp_samples": samples("", per_tenant([10, 5, 5, 1])),
        }
    )
    assert set(panels) == {*expected, dollars}
    case = {"interval": cost["interval"], "input_series": cost["input_series"]}
    done = run_cases(tmp_path, {**cases, "tests": [{**case, "promql_expr_test": tests}]})
    assert done.returncode == 0, done.stdout + done.stderr
