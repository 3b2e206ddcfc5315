"""Render a KubeRay `RayService` from a Serve config file: the one source of truth.

    python -m serve_app.kuberay render configs/gpu.yaml --overlay gpu \
        > kuberay/overlays/gpu/rayservice.yaml

What is derived from the config, so that it cannot drift:
- `serveConfigV2`: the config's applications, with HTTP bound for the pod network and a proxy on
  every node; each tier pinned to its own worker group through a custom Ray resource
  `tier_<name>` (added to the tier's `ray_resources` unless the tier names its own), the router
  to the `router` group (resource `serve_app_router`), the only pods that mount the API keys.
- one worker group per tier: `replicas`/`minReplicas`/`maxReplicas` from the tier's replica bounds
  (one Serve replica per pod), `nvidia.com/gpu` from `gpus_per_replica`, the tier resource
  advertised in `rayStartParams`; one `router` group with a pod per router replica.
- what a security review asks for (README "Kubernetes (KubeRay)"): Ray token authentication with
  the token read from a mounted Secret, secrets as files mounted only where they are read,
  Pod Security "restricted" settings, NetworkPolicies, and, where a model cache is mounted, the
  Job that fills it (serving pods mount it read-only and wait for it).
Pod sizes and scheduling hints that are not in the config come from `Overlay`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from .config import AppConfig, TierConfig
from .localstack import INGRESS_GUARDS, SERVE_TUNING

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "registry.example.com/serve-app:0.1.0"
IMAGE_UID = 10001  # the image's own user (kuberay/Dockerfile)
SERVE_PORT, METRICS_PORT, DASHBOARD_PORT = 8000, 8080, 8265
HEAD_PORTS = [
    {"containerPort": 6379, "name": "gcs-server"},
    {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
    {"containerPort": 10001, "name": "client"},
    {"containerPort": SERVE_PORT, "name": "serve"},
    {"containerPort": METRICS_PORT, "name": "metrics"},
]
WORKER_PORTS = [
    {"containerPort": SERVE_PORT, "name": "serve"},
    {"containerPort": METRICS_PORT, "name": "metrics"},
]
ROUTER_RESOURCE = "serve_app_router"
MODEL_CACHE = "/models"
# Every pod of the Ray cluster carries these labels; the NetworkPolicies select by them (the
# RayCluster's own name changes with every upgrade of a RayService).
RAY_POD_LABELS = {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/component": "ray"}
FILL_POD_LABELS = {"app.kubernetes.io/name": "serve-app",
                   "app.kubernetes.io/component": "model-cache-fill"}  # fmt: skip
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}


@dataclass(frozen=True)
class SecretFile:
    """A Secret's key, mounted as a file (never an environment variable)."""

    volume: str
    secret: str
    key: str
    directory: str
    optional: bool = False

    @property
    def path(self) -> str:
        return f"{self.directory}/{self.key}"

    def as_volume(self) -> dict[str, Any]:
        source: dict[str, Any] = {"secretName": self.secret, "defaultMode": 0o440,
                                  "items": [{"key": self.key, "path": self.key}]}  # fmt: skip
        if self.optional:
            source["optional"] = True
        return {"name": self.volume, "secret": source}

    def as_mount(self) -> dict[str, Any]:
        return {"name": self.volume, "mountPath": self.directory, "readOnly": True}


# Ray's token (KubeRay reads the same Secret to call the dashboard), on every Ray pod.
RAY_TOKEN = SecretFile("ray-auth-token", "ray-auth-token", "auth_token", "/etc/ray-auth")
# The tenants' API keys: only on the router's pods, re-read there when the Secret changes.
API_KEYS = SecretFile("api-keys", "serve-app-api-keys", "keys", "/etc/serve-app/api-keys")
# The Hugging Face token: only in the model-cache fill Job.
HF_TOKEN = SecretFile("hf-token", "hf-token", "token", "/etc/hf-token", optional=True)

# Every Ray container. One place for the environment; nothing in it is a secret.
RAY_ENV = [
    # The raylet reaps what a killed replica leaves (a TGI launcher's shards).
    {"name": "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "value": "true"},
    {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    *({"name": k, "value": v} for k, v in SERVE_TUNING.items()),
    # Serve's ingress: unfinished requests cut off, headers Serve reads made safe.
    *({"name": k, "value": v} for k, v in INGRESS_GUARDS.items()),
]
# Token auth with the token read from a file. KubeRay would otherwise add `RAY_AUTH_TOKEN` from
# the Secret as an environment variable, which every Ray worker process (and `ray job submit --
# env`) would see; it adds it only where the variable is not set, and Ray reads the token from
# `RAY_AUTH_TOKEN_PATH` when `RAY_AUTH_TOKEN` is empty.
TOKEN_AUTH_ENV = [
    {"name": "RAY_AUTH_MODE", "value": "token"},
    {"name": "RAY_AUTH_TOKEN", "value": ""},
    {"name": "RAY_AUTH_TOKEN_PATH", "value": RAY_TOKEN.path},
]
# The root filesystem is read-only: home, caches and Ray's temp dir live on the writable mounts.
WRITABLE_ENV = [{"name": "HOME", "value": "/tmp"}]
NO_CACHE_ENV = [{"name": "HF_HOME", "value": "/tmp/huggingface"}]
# The model cache, as both of TGI's readers find it: its Python downloader and loader read
# HUGGINGFACE_HUB_CACHE, its launcher (which reads the model's config.json first) $HF_HOME/hub.
CACHE_ENV = [
    {"name": "HF_HOME", "value": MODEL_CACHE},
    {"name": "HUGGINGFACE_HUB_CACHE", "value": f"{MODEL_CACHE}/hub"},
]
# Serving pods read the model cache the fill Job wrote, and never the Hub.
OFFLINE_ENV = [{"name": "HF_HUB_OFFLINE", "value": "1"}]

# Pod Security "restricted", for every container of every pod.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": IMAGE_UID,
    "runAsGroup": IMAGE_UID,
    "fsGroup": IMAGE_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": IMAGE_UID,
    "runAsGroup": IMAGE_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# The writable places: /tmp (home, engines' private dirs, compile caches), Ray's temp dir (named
# as KubeRay names it, so that the head's autoscaler shares it), and shared memory.
TMP = ({"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
       {"name": "tmp", "mountPath": "/tmp"})  # fmt: skip
RAY_TMP = ({"name": "ray-logs", "emptyDir": {"sizeLimit": "16Gi"}},
           {"name": "ray-logs", "mountPath": "/tmp/ray"})  # fmt: skip


class Role(Enum):
    HEAD = "head"
    ROUTER = "router"
    TIER = "tier"


@dataclass(frozen=True)
class Overlay:
    """What the config does not say about pods: sizes, and GPU nodes or not."""

    name: str
    gpu: bool
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    router_cpu: str = "2"
    router_memory: str = "4Gi"
    worker_cpu: str = "8"
    worker_memory: str = "64Gi"
    # NCCL between a replica's shards needs far more than the default 64 MiB; Ray's object store
    # lives here too. Memory-backed: it counts against the pod's memory limit.
    shm_size: str = "16Gi"
    model_cache_claim: str | None = "model-cache"
    node_selector: dict[str, str] = field(default_factory=dict)
    monitoring_namespace: str = "monitoring"


OVERLAYS = {
    "gpu": Overlay(
        "gpu", gpu=True, worker_cpu="8", worker_memory="96Gi",
        node_selector={"nvidia.com/gpu.present": "true"},
    ),
    "local": Overlay(
        "local", gpu=False, head_cpu="1", head_memory="3Gi", router_cpu="1",
        router_memory="2Gi", worker_cpu="2", worker_memory="3Gi", shm_size="1Gi",
        model_cache_claim=None,
    ),
}  # fmt: skip


def tier_resource(tier: TierConfig) -> str:
    return f"tier_{tier.name.replace('-', '_')}"


def _cluster_args(args: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    """The application's args for a cluster: every tier pinned to its worker group's resource,
    the router to the router group's, API keys read from the file the router's pods mount."""
    pinned = copy.deepcopy(args)
    router = pinned.setdefault("router", {})
    router.setdefault("api_keys", {"file": API_KEYS.path})
    router.setdefault("ray_resources", {ROUTER_RESOURCE: 1})
    for raw, tier in zip(pinned["tiers"], config.tiers, strict=True):
        raw.setdefault("ray_resources", {tier_resource(tier): 1})
    return pinned


def serve_config_v2(document: dict[str, Any]) -> tuple[str, AppConfig]:
    """The Serve config for the cluster, and its one application's config."""
    apps = document.get("applications") or []
    if len(apps) != 1:
        raise ValueError("a RayService is rendered from a config with exactly one application")
    app = dict(apps[0])
    config = AppConfig.model_validate(app.get("args", {}))
    app["args"] = _cluster_args(app.get("args", {}), config)
    rendered = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [app],
    }
    return yaml.safe_dump(rendered, sort_keys=False), AppConfig.model_validate(app["args"])


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"limits": limits, "requests": {"cpu": cpu, "memory": memory}}


def _env(role: Role, overlay: Overlay) -> list[dict[str, Any]]:
    cached = role is Role.TIER and overlay.model_cache_claim
    return [*RAY_ENV, *TOKEN_AUTH_ENV, *WRITABLE_ENV,
            *([*CACHE_ENV, *OFFLINE_ENV] if cached else NO_CACHE_ENV)]  # fmt: skip


def _volumes(role: Role, overlay: Overlay) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(volume, mount) pairs: the writable places, and the secrets this role reads."""
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": overlay.shm_size}}
    pairs = [TMP, RAY_TMP, (shm, {"name": "dshm", "mountPath": "/dev/shm"}),
             (RAY_TOKEN.as_volume(), RAY_TOKEN.as_mount())]  # fmt: skip
    if role is Role.ROUTER:
        pairs.append((API_KEYS.as_volume(), API_KEYS.as_mount()))
    if role is Role.TIER and overlay.model_cache_claim:
        claim = {"claimName": overlay.model_cache_claim, "readOnly": True}
        pairs.append(({"name": "models", "persistentVolumeClaim": claim},
                      {"name": "models", "mountPath": MODEL_CACHE, "readOnly": True}))  # fmt: skip
    return pairs


def _pod(
    role: Role, overlay: Overlay, image: str, resources: dict[str, Any], gpus: int = 0,
    init: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    pairs = _volumes(role, overlay)
    container = {
        "name": "ray-head" if role is Role.HEAD else "ray-worker",
        "image": image,
        "ports": HEAD_PORTS if role is Role.HEAD else WORKER_PORTS,
        "env": _env(role, overlay),
        "resources": resources,
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [mount for _, mount in pairs],
    }
    spec: dict[str, Any] = {
        # Only the head's autoscaler sidecar talks to the Kubernetes API.
        "automountServiceAccountToken": role is Role.HEAD,
        "securityContext": POD_SECURITY,
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": [volume for volume, _ in pairs],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]  # fmt: skip
        if overlay.node_selector:
            spec["nodeSelector"] = dict(overlay.node_selector)
    metadata: dict[str, Any] = {"labels": dict(RAY_POD_LABELS)}
    if role is Role.HEAD:
        # The policy scanner's one exception on a pod, stated where it applies.
        metadata["annotations"] = {
            "checkov.io/skip1": "CKV_K8S_38=the head's autoscaler sidecar scales worker groups "
            "through the Kubernetes API with this pod's service account token",
        }
    return {"metadata": metadata, "spec": spec}


def _models(tiers: list[TierConfig]) -> list[tuple[str, str | None]]:
    return sorted({(t.engine.model_id, t.engine.revision) for t in tiers}, key=str)


def _fill_marker(model: str, revision: str | None) -> str:
    """The file the fill Job writes once a model's weights are in the cache, named after the
    model and revision: serving pods wait for their model's marker."""
    digest = hashlib.sha256(json.dumps([model, revision]).encode()).hexdigest()[:12]
    return f"{MODEL_CACHE}/.serve-app/filled-{digest}"


def _wait_for_cache(image: str, marker: str) -> dict[str, Any]:
    return {
        "name": "wait-model-cache",
        "image": image,
        "command": ["/bin/sh", "-c",
                    f"until [ -f {marker} ]; do echo waiting for {marker}; sleep 10; done"],
        "resources": _resources("100m", "64Mi"),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "models", "mountPath": MODEL_CACHE, "readOnly": True}],
    }  # fmt: skip


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
    marker = _fill_marker(tier.engine.model_id, tier.engine.revision)
    init = [_wait_for_cache(image, marker)] if overlay.model_cache_claim else None
    sizes = _resources(overlay.worker_cpu, overlay.worker_memory, gpus)
    return {
        "groupName": f"tier-{tier.name}",
        "replicas": tier.replicas.min,
        "minReplicas": tier.replicas.min,
        "maxReplicas": tier.replicas.max,
        "rayStartParams": params,
        "template": _pod(Role.TIER, overlay, image, sizes, gpus, init),
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
        "template": _pod(Role.ROUTER, overlay, image,
                         _resources(overlay.router_cpu, overlay.router_memory)),
    }  # fmt: skip


def _autoscaler_options() -> dict[str, Any]:
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
        "resources": _resources("500m", "512Mi"),
    }


def render(
    document: dict[str, Any], overlay: Overlay, image: str = DEFAULT_IMAGE
) -> dict[str, Any]:
    serve_config, config = serve_config_v2(document)
    head_sizes = _resources(overlay.head_cpu, overlay.head_memory)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "llm", "labels": {"app.kubernetes.io/name": "serve-app"}},
        "spec": {
            "serveConfigV2": serve_config,
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # The token comes from this Secret (key `auth_token`), which KubeRay also reads
                # to call the dashboard; it creates none of its own.
                "authOptions": {"mode": "token", "secretName": RAY_TOKEN.secret},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": _autoscaler_options(),
                "headGroupSpec": {
                    # No replica on the head: it keeps the GCS, the dashboard and the Serve
                    # controller responsive. The dashboard listens on the pod network for the
                    # operator and the cluster's own pods (NetworkPolicy), behind the token.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(Role.HEAD, overlay, image, head_sizes),
                },
                "workerGroupSpecs": [
                    router_group(config, overlay, image),
                    *(worker_group(t, overlay, image) for t in config.tiers),
                ],
            },
        },
    }


def network_policies(overlay: Overlay) -> list[dict[str, Any]]:
    """Ingress to the Ray pods: Serve's HTTP port from anywhere (API keys guard it), the
    metrics port from the monitoring namespace, the dashboard (Serve's REST API) from the
    KubeRay operator, and every port from the cluster's own pods. The fill Job takes none."""
    tcp = "TCP"
    ray = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "llm-ray"},
        "spec": {
            "podSelector": {"matchLabels": dict(RAY_POD_LABELS)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(RAY_POD_LABELS)}}]},
                {"ports": [{"port": SERVE_PORT, "protocol": tcp}]},
                {
                    "from": [{"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": overlay.monitoring_namespace}}}],
                    "ports": [{"port": METRICS_PORT, "protocol": tcp}],
                },
                {
                    "from": [{"namespaceSelector": {},
                              "podSelector": {"matchLabels": dict(OPERATOR_LABELS)}}],
                    "ports": [{"port": DASHBOARD_PORT, "protocol": tcp}],
                },
            ],
        },
    }  # fmt: skip
    policies = [ray]
    if overlay.model_cache_claim:
        policies.append({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "model-cache-fill"},
            "spec": {"podSelector": {"matchLabels": dict(FILL_POD_LABELS)},
                     "policyTypes": ["Ingress"]},
        })  # fmt: skip
    return policies


def fill_job(config: AppConfig, overlay: Overlay, image: str) -> dict[str, Any]:
    """Download every tier's weights into the model cache with TGI's own downloader, then
    write each model's marker, which its serving pods wait for. Idempotent: files already in the
    cache are kept, and a finished Job is not run again; a new model set is a new Job (its name
    carries their hash)."""
    steps = ["set -eu", f"mkdir -p {MODEL_CACHE}/.serve-app"]
    markers = []
    for model, revision in _models(list(config.tiers)):
        args = ["text-generation-server", "download-weights", model]
        if revision:
            args += ["--revision", revision]
        markers.append(_fill_marker(model, revision))
        steps += [shlex.join(args), f"touch {markers[-1]}"]
    cache = {"name": "models", "persistentVolumeClaim": {"claimName": overlay.model_cache_claim}}
    volumes = [TMP, (HF_TOKEN.as_volume(), HF_TOKEN.as_mount()),
               (cache, {"name": "models", "mountPath": MODEL_CACHE})]  # fmt: skip
    container = {
        "name": "fill",
        "image": image,
        "command": ["/bin/sh", "-c", "\n".join(steps) + "\n"],
        "env": [
            *WRITABLE_ENV,
            *CACHE_ENV,
            # huggingface_hub reads the token from this file itself.
            {"name": "HF_TOKEN_PATH", "value": HF_TOKEN.path},
        ],
        "resources": _resources("2", "8Gi"),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [mount for _, mount in volumes],
    }
    name = "model-cache-fill-" + hashlib.sha256("".join(markers).encode()).hexdigest()[:10]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": dict(FILL_POD_LABELS)},
        "spec": {
            "backoffLimit": 6,
            "template": {
                "metadata": {"labels": dict(FILL_POD_LABELS)},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [volume for volume, _ in volumes],
                },
            },
        },
    }


def manifests(document: dict[str, Any], overlay: Overlay, image: str) -> list[dict[str, Any]]:
    """Everything an overlay deploys that comes from the config."""
    service = render(document, overlay, image)
    docs = [service, *network_policies(overlay)]
    if overlay.model_cache_claim:
        _, config = serve_config_v2(document)
        docs.append(fill_job(config, overlay, image))
    return docs


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
    docs = manifests(document, OVERLAYS[overlay], image)
    header = HEADER.format(config=config.as_posix(), overlay=overlay)
    return header + yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.kuberay")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "render", help="print the RayService (and its NetworkPolicies, fill Job) for a config"
    )
    cmd.add_argument("config", type=Path)
    cmd.add_argument("--overlay", choices=sorted(OVERLAYS), required=True)
    cmd.add_argument("--image", default=DEFAULT_IMAGE)
    args = parser.parse_args(argv)
    sys.stdout.write(render_file(args.config, args.overlay, args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
