"""The RayCluster's worker groups (one per tier, one for the router), the custom Ray resources
that pin each to its group, and the head's autoscaler sidecar."""

from __future__ import annotations

import json
from typing import Any

from ..config import AppConfig, TierConfig
from .model_cache import fill_marker, wait_for_cache
from .overlays import Overlay
from .pods import NO_CACHE_ENV, TMP, WRITABLE_ENV, Role, container_resources, pod
from .security import CONTAINER_SECURITY, RAY_TOKEN, TOKEN_AUTH_ENV

ROUTER_RESOURCE = "serve_app_router"


def tier_resource(tier: TierConfig) -> str:
    return f"tier_{tier.name.replace('-', '_')}"


def worker_group(tier: TierConfig, overlay: Overlay, image: str) -> dict[str, Any]:
    if tier.tuning.cpus_per_replica > float(overlay.worker_cpu):
        raise ValueError(
            f"tier {tier.name!r} asks {tier.tuning.cpus_per_replica} CPUs per replica; the "
            f"{overlay.name!r} overlay's workers have {overlay.worker_cpu}"
        )
    gpus = tier.gpus_per_replica if overlay.gpu else 0
    amounts = {k: int(v) if float(v).is_integer() else v for k, v in tier.ray_resources.items()}
    resources = json.dumps(amounts, separators=(",", ":"))
    params = {"resources": f"'{resources}'", "num-cpus": overlay.worker_cpu}
    if gpus:
        params["num-gpus"] = str(gpus)
    marker = fill_marker(tier.engine.model_id, tier.engine.revision)
    init = [wait_for_cache(image, marker)] if overlay.model_cache_claim else None
    sizes = container_resources(overlay.worker_cpu, overlay.worker_memory, gpus)
    return {
        "groupName": f"tier-{tier.name}",
        "replicas": tier.replicas.min,
        "minReplicas": tier.replicas.min,
        "maxReplicas": tier.replicas.max,
        "rayStartParams": params,
        "template": pod(Role.TIER, overlay, image, sizes, gpus, init),
    }


def router_group(config: AppConfig, overlay: Overlay, image: str) -> dict[str, Any]:
    """One pod per router replica; `num-cpus: 0` keeps every other task and actor off it."""
    amounts = {k: int(v) if float(v).is_integer() else v
               for k, v in config.router.ray_resources.items()}  # fmt: skip
    resources = json.dumps(amounts, separators=(",", ":"))
    replicas = config.router.replicas
    return {
        "groupName": "router",
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": {"resources": f"'{resources}'", "num-cpus": "0"},
        "template": pod(Role.ROUTER, overlay, image,
                        container_resources(overlay.router_cpu, overlay.router_memory)),
    }  # fmt: skip


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
