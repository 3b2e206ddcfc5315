"""Render a KubeRay `RayService` from a Serve config file: the one source of truth.

    python -m serve_app.kuberay render configs/gpu.yaml --overlay gpu \
        > kuberay/overlays/gpu/rayservice.yaml

What is derived from the config, so that it cannot drift:
- `serveConfigV2`: the config's applications, with HTTP bound for the pod network and a proxy on
  every node; each tier pinned to its own worker group through a custom Ray resource
  `tier_<name>` (added to the tier's `ray_resources` unless the tier names its own).
- one worker group per tier: `replicas`/`minReplicas`/`maxReplicas` from the tier's replica bounds
  (one Serve replica per pod), `nvidia.com/gpu` from `gpus_per_replica`, the tier resource
  advertised in `rayStartParams`.
Pod sizes and scheduling hints that are not in the config come from `Overlay`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import AppConfig, TierConfig
from .localstack import SERVE_TUNING

RAY_VERSION = "2.60.0"
API_KEYS_ENV = "SERVE_APP_API_KEYS"
DEFAULT_IMAGE = "registry.example.com/serve-app:0.1.0"
RAY_PORTS = [
    {"containerPort": 6379, "name": "gcs-server"},
    {"containerPort": 8265, "name": "dashboard"},
    {"containerPort": 10001, "name": "client"},
    {"containerPort": 8000, "name": "serve"},
    {"containerPort": 8080, "name": "metrics"},
]
# Every Ray container: the raylet reaps what a killed replica leaves (a TGI launcher's shards).
RAY_ENV = [
    {"name": "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "value": "true"},
    {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    *({"name": k, "value": v} for k, v in SERVE_TUNING.items()),
]
# Engines read their Hugging Face token and model cache from here.
ENGINE_ENV = [
    {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}},
    },
    {"name": "HUGGINGFACE_HUB_CACHE", "value": "/models"},
]


@dataclass(frozen=True)
class Overlay:
    """What the config does not say about pods: sizes, and GPU nodes or not."""

    name: str
    gpu: bool
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_cpu: str = "8"
    worker_memory: str = "64Gi"
    model_cache_claim: str | None = "model-cache"
    node_selector: dict[str, str] = field(default_factory=dict)
    # API keys are on in every cluster: read from this Secret's key `keys` (see router/auth.py).
    api_keys_secret: str = "serve-app-api-keys"


OVERLAYS = {
    "gpu": Overlay(
        "gpu", gpu=True, worker_cpu="8", worker_memory="96Gi",
        node_selector={"nvidia.com/gpu.present": "true"},
    ),
    "local": Overlay(
        "local", gpu=False, head_cpu="1", head_memory="3Gi", worker_cpu="2",
        worker_memory="3Gi", model_cache_claim=None,
    ),
}  # fmt: skip


def tier_resource(tier: TierConfig) -> str:
    return f"tier_{tier.name.replace('-', '_')}"


def _cluster_args(args: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    """The application's args for a cluster: every tier pinned to its worker group's resource,
    API keys read from the environment (filled from a Secret)."""
    pinned = copy.deepcopy(args)
    pinned.setdefault("router", {}).setdefault("api_keys", {"env": API_KEYS_ENV})
    for raw, tier in zip(pinned["tiers"], config.tiers, strict=True):
        raw.setdefault("ray_resources", {tier_resource(tier): 1})
    return pinned


def serve_config_v2(document: dict[str, Any]) -> tuple[str, list[TierConfig]]:
    """The Serve config for the cluster, and the tiers of its one application."""
    apps = document.get("applications") or []
    if len(apps) != 1:
        raise ValueError("a RayService is rendered from a config with exactly one application")
    app = dict(apps[0])
    config = AppConfig.model_validate(app.get("args", {}))
    app["args"] = _cluster_args(app.get("args", {}), config)
    rendered = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [app],
    }
    tiers = list(AppConfig.model_validate(app["args"]).tiers)
    return yaml.safe_dump(rendered, sort_keys=False), tiers


def _api_keys_env(overlay: Overlay) -> dict[str, Any]:
    secret = {"name": overlay.api_keys_secret, "key": "keys"}
    return {"name": API_KEYS_ENV, "valueFrom": {"secretKeyRef": secret}}


def _container(
    name: str, image: str, cpu: str, memory: str, gpus: int, overlay: Overlay
) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {
        "name": name,
        "image": image,
        "ports": RAY_PORTS,
        "env": [*RAY_ENV, *ENGINE_ENV, _api_keys_env(overlay)],
        "resources": {"limits": limits, "requests": {"cpu": cpu, "memory": memory}},
        "volumeMounts": [{"name": "models", "mountPath": "/models"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }  # fmt: skip


def _pod(container: dict[str, Any], overlay: Overlay, gpus: int) -> dict[str, Any]:
    models: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": overlay.model_cache_claim}}
        if overlay.model_cache_claim
        else {"emptyDir": {}}
    )
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "models", **models},
            # NCCL between a replica's shards needs far more than the default 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        ],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]  # fmt: skip
        if overlay.node_selector:
            spec["nodeSelector"] = dict(overlay.node_selector)
    return {"spec": spec}


def worker_group(tier: TierConfig, overlay: Overlay, image: str) -> dict[str, Any]:
    if tier.cpus_per_replica > float(overlay.worker_cpu):
        raise ValueError(
            f"tier {tier.name!r} asks {tier.cpus_per_replica} CPUs per replica; the "
            f"{overlay.name!r} overlay's workers have {overlay.worker_cpu}"
        )
    gpus = tier.gpus_per_replica if overlay.gpu else 0
    amounts = {k: int(v) if float(v).is_integer() else v for k, v in tier.ray_resources.items()}
    resources = json.dumps(amounts, separators=(",", ":"))
    params = {"resources": f"'{resources}'", "num-cpus": overlay.worker_cpu}
    if gpus:
        params["num-gpus"] = str(gpus)
    container = _container(
        "ray-worker", image, overlay.worker_cpu, overlay.worker_memory, gpus, overlay
    )
    return {
        "groupName": f"tier-{tier.name}",
        "replicas": tier.replicas.min,
        "minReplicas": tier.replicas.min,
        "maxReplicas": tier.replicas.max,
        "rayStartParams": params,
        "template": _pod(container, overlay, gpus),
    }


def render(
    document: dict[str, Any], overlay: Overlay, image: str = DEFAULT_IMAGE
) -> dict[str, Any]:
    serve_config, tiers = serve_config_v2(document)
    head = _container("ray-head", image, overlay.head_cpu, overlay.head_memory, 0, overlay)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "llm", "labels": {"app.kubernetes.io/name": "serve-app"}},
        "spec": {
            "serveConfigV2": serve_config,
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
                "headGroupSpec": {
                    # No replica on the head: it keeps the GCS, the dashboard and the Serve
                    # controller responsive.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(head, overlay, 0),
                },
                "workerGroupSpecs": [worker_group(t, overlay, image) for t in tiers],
            },
        },
    }


class _ManifestDumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2 stays readable), and no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str)


HEADER = (
    "# Rendered by `python -m serve_app.kuberay render {config} --overlay {overlay}`.\n"
    "# Do not edit: change the config and render again (a test fails on drift).\n"
)


def render_file(config: Path, overlay: str, image: str = DEFAULT_IMAGE) -> str:
    document = yaml.safe_load(config.read_text())
    manifest = render(document, OVERLAYS[overlay], image)
    header = HEADER.format(config=config.as_posix(), overlay=overlay)
    return header + yaml.dump(manifest, Dumper=_ManifestDumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.kuberay")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("render", help="print the RayService for a config")
    cmd.add_argument("config", type=Path)
    cmd.add_argument("--overlay", choices=sorted(OVERLAYS), required=True)
    cmd.add_argument("--image", default=DEFAULT_IMAGE)
    args = parser.parse_args(argv)
    sys.stdout.write(render_file(args.config, args.overlay, args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
