"""The RayCluster's worker groups (one per tier, one for the router), the custom Ray resources
that pin each to its group, their disruption budgets, and the head's autoscaler sidecar."""

from __future__ import annotations

import json
from typing import Any

from ..config import AppConfig, KubernetesConfig, TierConfig
from .disruption import GROUP_LABEL, disruption_budget, topology_spread
from .overlays import Overlay
from .pods import NO_CACHE_ENV, TMP, WRITABLE_ENV, Role, container_resources, pod
from .security import CONTAINER_SECURITY, RAY_TOKEN, TOKEN_AUTH_ENV
from .sizing import router_shape, tier_shape

ROUTER_RESOURCE = "serve_app_router"
ROUTER_GROUP = "router"


def tier_resource(tier: TierConfig) -> str:
    return f"tier_{tier.name.replace('-', '_')}"


def tier_group(tier: TierConfig) -> str:
    return f"tier-{tier.name}"


def worker_group(
    tier: TierConfig, kube: KubernetesConfig, overlay: Overlay, image: str
) -> dict[str, Any]:
    shape = tier_shape(tier, kube, overlay)
    amounts = {k: int(v) if float(v).is_integer() else v for k, v in tier.ray_resources.items()}
    resources = json.dumps(amounts, separators=(",", ":"))
    params = {"resources": f"'{resources}'", "num-cpus": shape.ray_cpus}
    if shape.gpus:
        params["num-gpus"] = str(shape.gpus)
    name = tier_group(tier)
    return {
        "groupName": name,
        "replicas": tier.replicas.min,
        "minReplicas": tier.replicas.min,
        "maxReplicas": tier.replicas.max,
        "rayStartParams": params,
        "template": pod(Role.TIER, overlay, image, shape, {GROUP_LABEL: name},
                        topology_spread(name, kube.spread)),
    }  # fmt: skip


def router_group(config: AppConfig, overlay: Overlay, image: str) -> dict[str, Any]:
    """One pod per router replica; `num-cpus: 0` keeps every other task and actor off it."""
    amounts = {k: int(v) if float(v).is_integer() else v
               for k, v in config.router.ray_resources.items()}  # fmt: skip
    resources = json.dumps(amounts, separators=(",", ":"))
    replicas = config.router.replicas
    shape = router_shape(config.kubernetes, overlay)
    return {
        "groupName": ROUTER_GROUP,
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {"resources": f"'{resources}'", "num-cpus": "0"},
        "template": pod(Role.ROUTER, overlay, image, shape, {GROUP_LABEL: ROUTER_GROUP},
                        topology_spread(ROUTER_GROUP, config.kubernetes.spread)),
    }  # fmt: skip


def disruption_budgets(config: AppConfig) -> list[dict[str, Any]]:
    """One PodDisruptionBudget per worker group: the router's and each tier's."""
    kube = config.kubernetes
    budgets = [disruption_budget(ROUTER_GROUP, kube.router.max_unavailable)]
    budgets += [disruption_budget(tier_group(t), kube.tier(t.name).max_unavailable)
                for t in config.tiers]  # fmt: skip
    return budgets


def autoscaler_options() -> dict[str, Any]:
    """The autoscaler sidecar KubeRay adds to the head pod: the same token file, restricted.

    KubeRay sets `RAY_AUTH_TOKEN` from the Secret on this container before it appends these
    variables; the later definition of a name is the one the container gets, so the sidecar too
    reads the token from the file.
    """
    return {
        "upscalingMode": "Default",
        "idleTimeoutSeconds": 300,
        "env": [*TOKEN_AUTH_ENV[1:], *WRITABLE_ENV, *NO_CACHE_ENV],
        "volumeMounts": [RAY_TOKEN.as_mount(), TMP[1]],
        "securityContext": CONTAINER_SECURITY,
        "resources": container_resources("500m", "512Mi"),
    }
