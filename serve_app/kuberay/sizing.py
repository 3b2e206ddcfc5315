"""Each Ray pod's size and placement: the config's `kubernetes` section where it says, derived
from the tier (its GPUs) and the overlay where it does not (docs/kubernetes.md, "Pod sizes")."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import KubernetesConfig, PodSettings, TierConfig, Toleration
from .overlays import Overlay

# A GPU tier's pod, per GPU of a replica: the engine's tokenizer and scheduler, Ray, one process
# per shard, and the host memory its shard's weights pass through while they load.
CPU_PER_GPU = 8
MEMORY_GIB_PER_GPU = 64
# ... and once per pod: Ray's own processes, the router-facing side of the engine.
MEMORY_GIB_BASE = 16
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_CPU = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m?)$")


@dataclass(frozen=True)
class PodShape:
    """What a pod template says about size and placement."""

    cpu: str
    memory: str
    gpus: int = 0
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    priority_class: str | None = None

    @property
    def ray_cpus(self) -> str:
        """`num-cpus` for Ray: the whole cores of the pod's CPU limit."""
        return str(math.floor(cores(self.cpu)))


def cores(quantity: str) -> float:
    """A CPU quantity (`8`, `2.5`, `500m`) in cores."""
    match = _CPU.match(quantity)
    if not match:
        raise ValueError(f"{quantity!r} is not a CPU quantity (e.g. 8, 2.5, 500m)")
    value = float(match.group(1))
    return value / 1000 if match.group(2) else value


def derived_tier_size(tier: TierConfig, overlay: Overlay) -> tuple[str, str]:
    """(cpu, memory) for a tier's pod when the config does not say: per GPU on a GPU overlay,
    the overlay's CPU worker size otherwise; never fewer cores than the replica reserves."""
    gpus = tier.gpus_per_replica if overlay.gpu else 0
    least = math.ceil(tier.tuning.cpus_per_replica)
    if gpus:
        memory = MEMORY_GIB_BASE + MEMORY_GIB_PER_GPU * gpus
        return str(max(CPU_PER_GPU * gpus, least)), f"{memory}Gi"
    cpu = overlay.worker_cpu if cores(overlay.worker_cpu) >= least else str(least)
    return cpu, overlay.worker_memory


def _tolerations(settings: PodSettings, gpus: int) -> tuple[dict[str, Any], ...]:
    own = tuple(_toleration(t) for t in settings.tolerations)
    return ((GPU_TOLERATION,) if gpus else ()) + own


def _toleration(toleration: Toleration) -> dict[str, Any]:
    return {k: v for k, v in toleration.model_dump().items() if v is not None}


def tier_shape(tier: TierConfig, kube: KubernetesConfig, overlay: Overlay) -> PodShape:
    settings = kube.tier(tier.name)
    gpus = tier.gpus_per_replica if overlay.gpu else 0
    cpu, memory = derived_tier_size(tier, overlay)
    cpu, memory = settings.cpu or cpu, settings.memory or memory
    if tier.tuning.cpus_per_replica > cores(cpu):
        raise ValueError(
            f"tier {tier.name!r} asks {tier.tuning.cpus_per_replica} CPUs per replica; its pods "
            f"have {cpu} (kubernetes.tiers[].cpu)"
        )
    selector = dict(overlay.node_selector) if gpus else {}
    if gpus and settings.accelerator:
        selector[kube.accelerator_label] = settings.accelerator
    selector.update(settings.node_selector)
    return PodShape(cpu, memory, gpus, selector, _tolerations(settings, gpus),
                    settings.priority_class)  # fmt: skip


def router_shape(kube: KubernetesConfig, overlay: Overlay) -> PodShape:
    return _cpu_shape(kube.router, overlay.router_cpu, overlay.router_memory)


def head_shape(kube: KubernetesConfig, overlay: Overlay) -> PodShape:
    return _cpu_shape(kube.head, overlay.head_cpu, overlay.head_memory)


def _cpu_shape(settings: PodSettings, cpu: str, memory: str) -> PodShape:
    return PodShape(settings.cpu or cpu, settings.memory or memory, 0,
                    dict(settings.node_selector), _tolerations(settings, 0),
                    settings.priority_class)  # fmt: skip
