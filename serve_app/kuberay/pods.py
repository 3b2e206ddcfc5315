"""The pod template of every Ray pod (head, router, tier): ports, labels, environment, writable
and secret volumes, resources and scheduling."""

from __future__ import annotations

from enum import Enum
from typing import Any

from ..pod_log import ENV as POD_LOG_ENV
from ..pod_log import ON_KUBERNETES as POD_LOG_ON_KUBERNETES
from ..serve_env import IMAGE_SCRIPTS, INGRESS_GUARDS, SERVE_TUNING, haproxy_guard
from ..tier.model_fill import MODEL_CACHE_ENV
from .overlays import Overlay
from .security import (
    API_KEYS,
    CONTAINER_SECURITY,
    EVENTS_ACCOUNT,
    HF_TOKEN,
    POD_SECURITY,
    RAY_TOKEN,
    TOKEN_AUTH_ENV,
)
from .sizing import PodShape

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
MODEL_CACHE = "/models"
# Every pod of the Ray cluster carries these labels; the NetworkPolicies select by them (the
# RayCluster's own name changes with every upgrade of a RayService).
RAY_POD_LABELS = {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/component": "ray"}

# Every Ray container. One place for the environment; nothing in it is a secret.
RAY_ENV = [
    # The raylet reaps what a killed replica leaves (a TGI launcher's shards).
    {"name": "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper", "value": "true"},
    {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    *({"name": k, "value": v} for k, v in SERVE_TUNING.items()),
    # Serve's ingress: unfinished requests cut off, headers Serve reads made safe.
    *({"name": k, "value": v} for k, v in INGRESS_GUARDS.items()),
    # HAProxy without kernel splicing: a client that leaves a whole answer stops its generation.
    *({"name": k, "value": v} for k, v in haproxy_guard(IMAGE_SCRIPTS).items()),
    # Engine output and usage lines also to the pod's log, where `kubectl logs` shows them.
    {"name": POD_LOG_ENV, "value": POD_LOG_ON_KUBERNETES},
]
# The root filesystem is read-only: home, caches and Ray's temp dir live on the writable mounts.
WRITABLE_ENV = [{"name": "HOME", "value": "/tmp"}]
NO_CACHE_ENV = [{"name": "HF_HOME", "value": "/tmp/huggingface"}]
# The model cache, as both of TGI's readers find it: its Python downloader and loader read
# HUGGINGFACE_HUB_CACHE, its launcher (which reads the model's config.json first) $HF_HOME/hub.
# Where it is mounted, each tier replica fills it with its own model before its engine starts
# (serve_app.tier.model_fill): no pod names a model, so a model change leaves the pods as they are.
CACHE_ENV = [
    {"name": "HF_HOME", "value": MODEL_CACHE},
    {"name": "HUGGINGFACE_HUB_CACHE", "value": f"{MODEL_CACHE}/hub"},
    {"name": MODEL_CACHE_ENV, "value": MODEL_CACHE},
]
# Engines read the model cache their replica filled, and never the Hub (the fill itself is
# online).
OFFLINE_ENV = [{"name": "HF_HUB_OFFLINE", "value": "1"}]

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


def container_resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"limits": limits, "requests": {"cpu": cpu, "memory": memory}}


def _env(role: Role, overlay: Overlay) -> list[dict[str, Any]]:
    cached = role is Role.TIER and overlay.model_cache_claim
    # Tier pods download weights: their replicas into the model cache, or without one their
    # engines into their own. The replica reads the token file at every fill and engine start:
    # a rotated Secret is used by the next one, without a pod restart.
    token = [{"name": "HF_TOKEN_PATH", "value": HF_TOKEN.path}] if role is Role.TIER else []
    return [*RAY_ENV, *TOKEN_AUTH_ENV, *WRITABLE_ENV,
            *([*CACHE_ENV, *OFFLINE_ENV] if cached else NO_CACHE_ENV), *token]  # fmt: skip


def _volumes(role: Role, overlay: Overlay) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(volume, mount) pairs: the writable places, and the secrets this role reads."""
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": overlay.shm_size}}
    pairs = [TMP, RAY_TMP, (shm, {"name": "dshm", "mountPath": "/dev/shm"}),
             (RAY_TOKEN.as_volume(), RAY_TOKEN.as_mount())]  # fmt: skip
    if role is Role.ROUTER:
        pairs.append((API_KEYS.as_volume(), API_KEYS.as_mount()))
    if role is Role.TIER:
        pairs.append((HF_TOKEN.as_volume(), HF_TOKEN.as_mount()))
    if role is Role.TIER and overlay.model_cache_claim:
        # written by the tier replicas' fills, one download per model (a lock in the cache)
        claim = {"claimName": overlay.model_cache_claim}
        pairs.append(({"name": "models", "persistentVolumeClaim": claim},
                      {"name": "models", "mountPath": MODEL_CACHE}))  # fmt: skip
    return pairs


def pod(
    role: Role, overlay: Overlay, image: str, shape: PodShape,
    labels: dict[str, str] | None = None, spread: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A Ray pod's template: `shape` says its size and placement, `labels` (beside
    `RAY_POD_LABELS`) its group, `spread` its topology spread constraints."""
    pairs = _volumes(role, overlay)
    container = {
        "name": "ray-head" if role is Role.HEAD else "ray-worker",
        "image": image,
        "ports": HEAD_PORTS if role is Role.HEAD else WORKER_PORTS,
        "env": _env(role, overlay),
        "resources": container_resources(shape.cpu, shape.memory, shape.gpus),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [mount for _, mount in pairs],
    }
    spec: dict[str, Any] = {
        # The head's autoscaler sidecar talks to the Kubernetes API, and the tier replicas post
        # Events on their pod (their account may do nothing else: `security.events_account`).
        "automountServiceAccountToken": role in (Role.HEAD, Role.TIER),
        **({"serviceAccountName": EVENTS_ACCOUNT} if role is Role.TIER else {}),
        "securityContext": POD_SECURITY,
        "containers": [container],
        "volumes": [volume for volume, _ in pairs],
    }
    if shape.tolerations:
        spec["tolerations"] = [dict(t) for t in shape.tolerations]
    if shape.node_selector:
        spec["nodeSelector"] = dict(shape.node_selector)
    if shape.priority_class:
        spec["priorityClassName"] = shape.priority_class
    if spread:
        spec["topologySpreadConstraints"] = spread
    metadata: dict[str, Any] = {"labels": {**RAY_POD_LABELS, **(labels or {})}}
    if role is Role.HEAD:
        # The policy scanner's one exception on a pod, stated where it applies.
        metadata["annotations"] = {
            "checkov.io/skip1": "CKV_K8S_38=the head's autoscaler sidecar scales worker groups "
            "through the Kubernetes API with this pod's service account token",
        }
    if role is Role.TIER:
        metadata["annotations"] = {
            "checkov.io/skip1": "CKV_K8S_38=the tier replicas post their start-up phases as "
            "Events on this pod; the account may only create Events",
        }
    return {"metadata": metadata, "spec": spec}
