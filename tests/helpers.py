"""Test helpers for a running stack: waiting for a condition, reading Ray's metrics.

Finding engines, routers and free ports: `devstack.hosts`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def metric_samples(metrics_port: int, name: str, host: str = "127.0.0.1") -> dict[str, float]:
    """A metric's samples from Ray's metrics port: labels text -> value."""
    text = httpx.get(f"http://{host}:{metrics_port}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            found[labels] = float(value)
    return found


def lease_grants(metrics_port: int, tier: str) -> float:
    """Engine leases a tier's replicas have granted (`ray_serve_app_engine_lease_grants`)."""
    grants = metric_samples(metrics_port, "ray_serve_app_engine_lease_grants_total")
    return sum(v for labels, v in grants.items() if f'tier="{tier}"' in labels)


def settled_value(read: Callable[[], float], quiet_s: float = 25) -> float:
    """A counter once it has stopped changing for `quiet_s` (Ray exports every 10 s)."""
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def all_deployments(applications: dict[str, Any]) -> dict[str, Any]:
    """Every deployment of a Serve status (the dashboard's `applications`, or `serve status`'s),
    by name, whatever application holds it: the router's (`llm`) or a tier's own."""
    return {
        name: deployment
        for app in applications.values()
        for name, deployment in (app.get("deployments") or {}).items()
    }
