"""The dashboard and the alerts, read statically: the seeds' panels and alerts are there, each
alert has a runbook, every metric they use is one the application or Ray defines, and
docs/operations.md lists them. (tests/integration/test_monitoring.py runs them against a real
Prometheus.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ray.dashboard.consts import GPU_TAG_KEYS
from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

from tests import monitoring
from tests.monitoring import GRAFANA_VALUES, Query

ROOT = Path(__file__).resolve().parents[2]
APP_METRICS = (ROOT / "serve_app" / "metrics.py").read_text()
SERVE_SOURCES = Path(__import__("ray.serve").serve.__file__).parent
QUERIES = [
    *monitoring.panel_queries(monitoring.dashboard(), GRAFANA_VALUES),
    *monitoring.alert_queries(monitoring.rule_groups()),
]
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "by", "on", "and", "or", "rate", "increase", "histogram_quantile",
    "bool", "le", "tier", "status", "tenant", "reason", "deployment", "ip", "GpuIndex",
    "GpuDeviceName",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    without_matchers = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    return {w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", without_matchers)} - PROMQL_WORDS


def defined(metric: str) -> bool:
    """Ray's exporter name `metric` comes from a metric the application or Ray defines."""
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
    panels = monitoring.dashboard()["panels"]
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
    rules = [r for g in monitoring.rule_groups()["groups"] for r in g["rules"]]
    for rule in rules:
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 40
        assert rule["labels"]["severity"] in ("warning", "critical")
    names = {r["alert"] for r in rules}
    assert {"TierSlowFirstToken", "TierSlowRequests", "TierQueueBacklog"} <= names
    assert "TierLowThroughput" in names


def test_operations_doc_lists_every_panel_and_alert() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    metrics = operations[operations.index("## Metrics") : operations.index("## Process hygiene")]
    for panel in monitoring.dashboard()["panels"]:
        assert panel["title"] in metrics
    for query in monitoring.alert_queries(monitoring.rule_groups()):
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
