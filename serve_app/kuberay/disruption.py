"""What keeps a node drain from taking a whole worker group: a PodDisruptionBudget per group and
topology spread of each group's pods over nodes and zones."""

from __future__ import annotations

from typing import Any

from ..config import Placement, TopologySpread
from .pods import RAY_POD_LABELS

# Every Ray pod carries its group's name under this label (the head: `head`); the budgets and
# spread constraints select by it. KubeRay's own cluster name changes with every upgrade.
GROUP_LABEL = "serve-app/group"
SPREAD_KEYS = (("nodes", "kubernetes.io/hostname"), ("zones", "topology.kubernetes.io/zone"))
_WHEN = {"preferred": "ScheduleAnyway", "required": "DoNotSchedule"}


def group_labels(group: str) -> dict[str, str]:
    return {**RAY_POD_LABELS, GROUP_LABEL: group}


def disruption_budget(group: str, max_unavailable: int) -> dict[str, Any]:
    """At most `max_unavailable` of the group's pods evicted at once (a drain waits for the
    replacement to be ready before it takes the next)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"llm-{group}"},
        "spec": {
            "maxUnavailable": max_unavailable,
            "selector": {"matchLabels": group_labels(group)},
        },
    }


def topology_spread(group: str, spread: TopologySpread) -> list[dict[str, Any]]:
    """The group's pods at most one apart across nodes and across zones, as configured."""
    constraints = []
    for name, key in SPREAD_KEYS:
        placement: Placement = getattr(spread, name)
        if placement == "off":
            continue
        constraints.append({
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": _WHEN[placement],
            "labelSelector": {"matchLabels": group_labels(group)},
        })  # fmt: skip
    return constraints
