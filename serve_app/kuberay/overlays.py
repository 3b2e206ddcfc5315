"""What the config does not say, per overlay: the default sizes of the head, router and CPU worker
pods (GPU tiers are sized per GPU, `sizing.py`), GPU nodes or not, the model cache's claim and
the monitoring namespace."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Overlay:
    """What the config does not say about pods: default sizes, and GPU nodes or not."""

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
    # where the KubeRay operator runs (`helm install … --namespace kuberay-system`)
    operator_namespace: str = "kuberay-system"


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
