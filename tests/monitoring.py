"""The queries an operator's Grafana and Prometheus will run: every dashboard panel target, every
alert expression and every recording rule, read from the shipped manifests, ready to send to a
real Prometheus."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "kuberay" / "base" / "grafana-dashboard.json"
RULES = ROOT / "kuberay" / "monitoring" / "prometheusrule.yaml"
RULE_TESTS = ROOT / "kuberay" / "monitoring" / "rules-test.yaml"  # `promtool test rules`

# What Grafana puts in place of its variables: the rate window it would pick for a short scrape
# interval, a dashboard range (and in seconds), and the `All` value of the tier variable.
GRAFANA_VALUES = {
    "__rate_interval": "1m",
    "__range": "10m",
    "__range_s": "600",
    "__interval": "15s",
    "tier": ".*",
}

# Ray exports these only for the GPUs it sees on a node.
GPU_METRICS = ("ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available")

# What a stack exports only where its tiers have GPUs (the GPU time tier replicas count) and a
# price of a GPU-hour, each with the names of the series recorded from it.
OPTIONAL_METRICS = {
    "ray_serve_app_gpu_seconds_total": (":serve_app_gpu_seconds:", ":serve_app_gpu_usd_per_hour:"),
    "ray_serve_app_gpu_hour_price_usd": (":serve_app_gpu_usd_per_hour:",),
}


@dataclass(frozen=True)
class Query:
    name: str  # where it comes from: panel title and refId, or alert name
    expr: str

    @property
    def needs_gpu(self) -> bool:
        return any(metric in self.expr for metric in GPU_METRICS)

    @property
    def optional_inputs(self) -> list[str]:
        """The metrics of OPTIONAL_METRICS without which it returns nothing."""
        return [
            metric
            for metric, recorded in OPTIONAL_METRICS.items()
            if any(name in self.expr for name in (metric, *recorded))
        ]


@cache
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


@cache
def rule_groups() -> dict[str, Any]:
    """The PrometheusRule's `spec`: what a plain Prometheus reads as a rule file."""
    return dict(yaml.safe_load(RULES.read_text())["spec"])


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables (`$name`, `${name}`, `[[name]]`) replaced by `values`; an unknown one
    is an error, as it would be a query Grafana cannot run."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"no value for the dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels with queries (not the rows that title them)."""
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def panel_queries(board: dict[str, Any], values: dict[str, str]) -> list[Query]:
    return [
        Query(f"{panel['title']} [{target['refId']}]", substitute(target["expr"], values))
        for panel in panels(board)
        for target in panel["targets"]
    ]


def variable_queries(board: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each query variable's `label_values(metric, label)` as (metric, label)."""
    found = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text.strip())
        if match is None:
            raise ValueError(f"variable {variable['name']}: unsupported query {text!r}")
        found[variable["name"]] = (match[1], match[2])
    return found


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)\s*")
_MATCHERS = re.compile(r"\{[^}]*\}")  # label matchers, where `!=` is no comparison


def as_signal(expr: str) -> str:
    """An alert expression that returns its series whether or not it fires: each comparison
    becomes a `bool` comparison (1 where the alert's condition holds, else 0)."""
    out, last = [], 0
    for matchers in [*_MATCHERS.finditer(expr), None]:
        end = matchers.start() if matchers else len(expr)
        out.append(_COMPARISON.sub(r"\1 bool ", expr[last:end]))
        if matchers:
            out.append(matchers.group())
            last = matchers.end()
    return "".join(out)


def alert_queries(groups: dict[str, Any]) -> list[Query]:
    return [
        Query(rule["alert"], rule["expr"].strip())
        for group in groups["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def record_queries(groups: dict[str, Any]) -> list[Query]:
    """Each recording rule's expression, named for the series it records."""
    return [
        Query(rule["record"], rule["expr"].strip())
        for group in groups["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]


def rule_count(groups: dict[str, Any]) -> int:
    return sum(len(group["rules"]) for group in groups["groups"])
