"""The dashboard, the alerts and the recording rules, read statically: the seeds' panels and
alerts are there, each alert has a runbook, every metric they use is one the application or Ray
defines or a rule records, every recorded series is used, the SLO alerts agree on their budgets,
every SLO and cost rule has a `promtool test rules` case, and docs/operations.md lists them all.
(tests/integration/test_monitoring.py runs them against a real Prometheus, test_rules.py runs
the promtool cases.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.dashboard.consts import GPU_TAG_KEYS
from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

from tests import monitoring
from tests.monitoring import GRAFANA_VALUES, Query

ROOT = Path(__file__).resolve().parents[2]
APP_METRICS = (ROOT / "serve_app" / "metrics.py").read_text()
SERVE_SOURCES = Path(__import__("ray.serve").serve.__file__).parent
PANEL_QUERIES = monitoring.panel_queries(monitoring.dashboard(), GRAFANA_VALUES)
ALERTS = monitoring.alert_queries(monitoring.rule_groups())
RECORDS = monitoring.record_queries(monitoring.rule_groups())
QUERIES = [*PANEL_QUERIES, *ALERTS, *RECORDS]
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "by", "on", "and", "or", "unless", "group_left", "rate",
    "increase", "histogram_quantile", "sum_over_time", "count_over_time", "topk", "abs",
    "label_replace", "scalar", "vector", "bool",
    "le", "tier", "status", "tenant", "feature", "reason", "deployment", "ip", "GpuIndex",
    "GpuDeviceName",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The series names in `expr`: exported ones and recorded ones (`level:metric:operations`)."""
    without_matchers = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_matchers)} - PROMQL_WORDS


def defined(metric: str) -> bool:
    """Ray's exporter name `metric` comes from a metric the application or Ray defines, or a
    recording rule records `metric`."""
    if ":" in metric:
        return metric in {r.name for r in RECORDS}
    assert metric.startswith("ray_"), metric
    base = re.sub(r"_(total|bucket|sum|count)$", "", metric.removeprefix("ray_"))
    if base.startswith("serve_app_"):
        return f'"{base}' in APP_METRICS
    if base.startswith("node_"):
        return base in METRICS_GAUGES
    if base.startswith("serve_"):
        return any(f'"{base}"' in p.read_text() for p in SERVE_SOURCES.rglob("*.py"))
    return False


@pytest.mark.parametrize("query", QUERIES, ids=[q.name for q in QUERIES])
def test_every_metric_used_is_exported_under_that_name(query: Query) -> None:
    names = metric_names(query.expr)
    assert names, query.expr
    assert [n for n in names if not defined(n)] == []


def test_gpu_metrics_carry_the_labels_the_panels_group_by() -> None:
    assert {"ip", "GpuIndex", "GpuDeviceName"} <= set(GPU_TAG_KEYS)


def test_the_seeds_panels_are_there() -> None:
    panels = monitoring.panels(monitoring.dashboard())
    exprs = " ".join(target["expr"] for panel in panels for target in panel["targets"])
    titles = " | ".join(panel["title"] for panel in panels).lower()
    for wanted in ("requests per second", "latency", "queue depth", "gpu utilisation",
                   "gpu memory", "tokens per second", "tenant"):  # fmt: skip
        assert wanted in titles
    duration = "rate(ray_serve_app_request_duration_seconds_bucket"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (tier, le) ({duration}" in exprs
    assert 'status=~"2.."' in exprs and 'status!~"2.."' in exprs
    assert "sum by (tenant, tier) (rate(ray_serve_app_tenant_tokens_total" in exprs


def test_every_alert_has_a_summary_and_a_runbook_and_the_seeds_alerts_are_there() -> None:
    rules = [r for g in monitoring.rule_groups()["groups"] for r in g["rules"] if "alert" in r]
    for rule in rules:
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 40
        assert rule["labels"]["severity"] in ("warning", "critical")
    names = {r["alert"] for r in rules}
    assert {"TierSlowFirstToken", "TierSlowRequests", "TierQueueBacklog"} <= names
    assert "TierLowThroughput" in names


def test_operations_doc_lists_every_panel_and_alert() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    metrics = operations[operations.index("## Metrics") : operations.index("## Process hygiene")]
    for panel in monitoring.panels(monitoring.dashboard()):
        assert panel["title"] in metrics
    for query in [*ALERTS, *RECORDS]:
        assert f"`{query.name}`" in metrics


def test_grafana_variables_are_substituted_and_unknown_ones_refused() -> None:
    expr = 'rate(x{tier=~"$tier"}[$__rate_interval]) + y{a="${tier}"} + [[tier]]'
    assert monitoring.substitute(expr, {"tier": ".*", "__rate_interval": "1m"}) == (
        'rate(x{tier=~".*"}[1m]) + y{a=".*"} + .*'
    )
    with pytest.raises(KeyError, match=r"\$nope"):
        monitoring.substitute("x[$nope]", {})
    assert all("$" not in q.expr for q in QUERIES)


def test_as_signal_makes_every_comparison_bool_outside_label_matchers() -> None:
    expr = 'sum(a{s!="5", t=~"x"}) > 2 and on (t) b <= 0.5 or c == d'
    assert monitoring.as_signal(expr) == (
        'sum(a{s!="5", t=~"x"}) > bool 2 and on (t) b <= bool 0.5 or c == bool d'
    )
    assert monitoring.as_signal("a > bool 1") == "a > bool 1"


def test_variable_queries_are_label_values() -> None:
    assert monitoring.variable_queries(monitoring.dashboard()) == {
        "tier": ("ray_serve_app_requests_total", "tier")
    }


def test_every_recorded_series_is_named_for_its_labels_and_used() -> None:
    """`level:metric:operations` (Prometheus's naming), and read by an alert, a panel or another
    recording rule."""
    for record in RECORDS:
        level, _, _ = record.name.split(":")
        from_record = re.match(r"(\w+):", record.expr)  # the level of the series it starts from
        if from_record:
            assert from_record[1] == level, record
        else:
            by = re.search(r"\bby \(([^)]*)\)", record.expr)
            assert by and {label.strip() for label in by[1].split(",")} == set(level.split("_"))
        readers = [q for q in [*PANEL_QUERIES, *ALERTS, *RECORDS] if q.name != record.name]
        assert [q.name for q in readers if record.name in metric_names(q.expr)], record.name


# The SLOs as docs/operations.md states them, and the multi-window burn-rate alerts of Google's
# SRE workbook: (burn rate, long window, short window).
SLOS = {"Availability": ("request_errors", 0.995), "FirstToken": ("slow_first_tokens", 0.95)}
BURNS = {
    "FastBurn": (14.4, "1h", "5m"),
    "SlowBurn": (6, "6h", "30m"),
    "BudgetDrain": (1, "3d", "6h"),
}
_BURN_CONDITION = re.compile(
    r"tier:serve_app_(\w+):ratio_rate(\w+) > \((?:([\d.]+) \* )?([\d.]+)\)"
)
_BURN_PANEL = re.compile(r"tier:serve_app_(\w+):ratio_rate\w+\{[^}]*\} / ([\d.]+)")


@pytest.mark.parametrize(
    ("slo", "burn"), [(s, b) for s in SLOS for b in BURNS], ids=[s + b for s in SLOS for b in BURNS]
)
def test_slo_alerts_compare_both_windows_with_burn_rate_times_budget(slo: str, burn: str) -> None:
    (alert,) = [a for a in ALERTS if a.name == f"Tier{slo}{burn}"]
    record, objective = SLOS[slo]
    rate, long, short = BURNS[burn]
    conditions = _BURN_CONDITION.findall(alert.expr)
    assert [(c[0], c[1]) for c in conditions] == [(record, long), (record, short)], alert.expr
    for _, _, factor, budget in conditions:
        assert float(factor or 1) == rate and float(budget) == round(1 - objective, 6)


def test_the_burn_rate_panels_divide_by_the_slo_budgets() -> None:
    found = {
        (record, float(budget))
        for q in PANEL_QUERIES
        for record, budget in _BURN_PANEL.findall(q.expr)
    }
    assert found == {(record, round(1 - objective, 6)) for record, objective in SLOS.values()}
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "99.5 %" in operations and "95 %" in operations


def _promtool_cases() -> list[dict[str, Any]]:
    return list(yaml.safe_load(monitoring.RULE_TESTS.read_text())["tests"])


def test_every_slo_and_cost_rule_has_a_promtool_case() -> None:
    """kuberay/monitoring/rules-test.yaml fires (or holds back) every SLO alert and reads every
    recorded series, directly or through the alert that uses it."""
    cases = _promtool_cases()
    alerts = {t["alertname"] for case in cases for t in case.get("alert_rule_test", [])}
    exprs = [t["expr"] for case in cases for t in case.get("promql_expr_test", [])]
    exprs += [a.expr for a in ALERTS if a.name in alerts]
    read = metric_names(" ".join(exprs))
    for group in monitoring.rule_groups()["groups"]:
        if group["name"] == "serve-app":  # the first alerts: tests/integration/test_monitoring.py
            continue
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] in alerts
            else:
                assert rule["record"] in read


def test_every_slo_alert_is_seen_firing_in_a_promtool_case() -> None:
    fired = {
        t["alertname"]
        for case in _promtool_cases()
        for t in case.get("alert_rule_test", [])
        if t["exp_alerts"]
    }
    assert {f"Tier{slo}{burn}" for slo in SLOS for burn in BURNS} <= fired
