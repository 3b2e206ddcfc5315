"""Disruption budgets and topology spread, per worker group."""

from __future__ import annotations

import pytest

from serve_app.config import AppConfig, TopologySpread
from serve_app.kuberay.disruption import GROUP_LABEL, disruption_budget, topology_spread
from serve_app.kuberay.groups import disruption_budgets
from serve_app.kuberay.pods import RAY_POD_LABELS


def test_a_budget_selects_its_groups_pods_only() -> None:
    budget = disruption_budget("tier-small", 1)
    assert budget["apiVersion"] == "policy/v1" and budget["metadata"]["name"] == "llm-tier-small"
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {**RAY_POD_LABELS, GROUP_LABEL: "tier-small"}},
    }


def test_one_budget_per_worker_group_with_the_configured_allowance() -> None:
    config = AppConfig.model_validate({
        "tiers": [{"name": "a"}, {"name": "b"}],
        "kubernetes": {"router": {"max_unavailable": 0}, "tiers": [{"tier": "b",
                                                                    "max_unavailable": 2}]},
    })  # fmt: skip
    found = {b["metadata"]["name"]: b["spec"]["maxUnavailable"] for b in disruption_budgets(config)}
    assert found == {"llm-router": 0, "llm-tier-a": 1, "llm-tier-b": 2}


def test_spread_is_over_nodes_and_zones_preferred_by_default() -> None:
    constraints = topology_spread("router", TopologySpread())
    assert [(c["topologyKey"], c["whenUnsatisfiable"], c["maxSkew"]) for c in constraints] == [
        ("kubernetes.io/hostname", "ScheduleAnyway", 1),
        ("topology.kubernetes.io/zone", "ScheduleAnyway", 1),
    ]
    for c in constraints:
        assert c["labelSelector"] == {"matchLabels": {**RAY_POD_LABELS, GROUP_LABEL: "router"}}


@pytest.mark.parametrize(
    ("nodes", "zones", "expected"),
    [
        ("required", "off", [("kubernetes.io/hostname", "DoNotSchedule")]),
        ("off", "required", [("topology.kubernetes.io/zone", "DoNotSchedule")]),
        ("off", "off", []),
    ],
)
def test_spread_as_configured(nodes: str, zones: str, expected: list[tuple[str, str]]) -> None:
    spread = TopologySpread.model_validate({"nodes": nodes, "zones": zones})
    constraints = topology_spread("g", spread)
    assert [(c["topologyKey"], c["whenUnsatisfiable"]) for c in constraints] == expected
