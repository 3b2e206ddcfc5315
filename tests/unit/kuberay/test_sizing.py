"""Pod sizes and placement: the config's `kubernetes` section where it says, derived per GPU
where it does not."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.config import AppConfig, KubernetesConfig, TierConfig
from serve_app.kuberay.overlays import OVERLAYS
from serve_app.kuberay.sizing import (
    CPU_PER_GPU,
    GPU_TOLERATION,
    MEMORY_GIB_BASE,
    MEMORY_GIB_PER_GPU,
    cores,
    derived_tier_size,
    head_shape,
    router_shape,
    tier_shape,
)

GPU, LOCAL = OVERLAYS["gpu"], OVERLAYS["local"]


def tgi(name: str, gpus: int, **extra: Any) -> TierConfig:
    return TierConfig.model_validate(
        {"name": name, "gpus_per_replica": gpus, "engine": {"launcher": "tgi"}, **extra}
    )


def kube(**settings: Any) -> KubernetesConfig:
    return KubernetesConfig.model_validate(settings)


@pytest.mark.parametrize(("quantity", "expected"), [("8", 8), ("2.5", 2.5), ("500m", 0.5)])
def test_cpu_quantities_read_as_cores(quantity: str, expected: float) -> None:
    assert cores(quantity) == expected


@pytest.mark.parametrize("quantity", ["8Gi", "", "1e3", "-1"])
def test_what_is_not_a_cpu_quantity_is_refused(quantity: str) -> None:
    with pytest.raises(ValueError, match="is not a CPU quantity"):
        cores(quantity)


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_a_gpu_tier_gets_cpu_and_memory_per_gpu(gpus: int) -> None:
    cpu, memory = derived_tier_size(tgi("t", gpus), GPU)
    assert cpu == str(CPU_PER_GPU * gpus)
    assert memory == f"{MEMORY_GIB_BASE + MEMORY_GIB_PER_GPU * gpus}Gi"


def test_the_one_and_four_gpu_tiers_differ() -> None:
    small, large = tier_shape(tgi("s", 1), kube(), GPU), tier_shape(tgi("l", 4), kube(), GPU)
    assert (small.cpu, small.memory, small.gpus) == ("8", "80Gi", 1)
    assert (large.cpu, large.memory, large.gpus) == ("32", "272Gi", 4)
    assert large.ray_cpus == "32"


def test_a_replica_that_reserves_more_cores_gets_them() -> None:
    tier = tgi("t", 1, tuning={"cpus_per_replica": 12})
    assert derived_tier_size(tier, GPU)[0] == "12"
    local = TierConfig.model_validate({"name": "t", "tuning": {"cpus_per_replica": 3.5}})
    assert derived_tier_size(local, LOCAL) == ("4", LOCAL.worker_memory)


def test_without_gpus_the_overlay_sizes_the_pod_and_no_gpu_placement_applies() -> None:
    shape = tier_shape(tgi("t", 2), kube(tiers=[{"tier": "t", "accelerator": "A100"}]), LOCAL)
    assert (shape.cpu, shape.memory, shape.gpus) == (LOCAL.worker_cpu, LOCAL.worker_memory, 0)
    assert shape.node_selector == {} and shape.tolerations == ()


def test_the_config_overrides_size_and_adds_placement() -> None:
    settings = kube(
        accelerator_label="cloud.google.com/gke-accelerator",
        tiers=[{
            "tier": "t", "cpu": "12", "memory": "100Gi", "accelerator": "nvidia-h100-80gb",
            "node_selector": {"pool": "llm"}, "priority_class": "serving-high",
            "tolerations": [{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}],
        }],
    )  # fmt: skip
    shape = tier_shape(tgi("t", 1), settings, GPU)
    assert (shape.cpu, shape.memory, shape.priority_class) == ("12", "100Gi", "serving-high")
    assert shape.node_selector == {
        **GPU.node_selector,
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
        "pool": "llm",
    }
    assert shape.tolerations == (
        GPU_TOLERATION,
        {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},
    )


def test_a_tier_not_listed_gets_the_defaults() -> None:
    settings = kube(tiers=[{"tier": "other", "cpu": "64"}])
    assert tier_shape(tgi("t", 1), settings, GPU).cpu == "8"


def test_a_pod_smaller_than_the_replicas_reservation_is_refused() -> None:
    settings = kube(tiers=[{"tier": "t", "cpu": "4"}])
    with pytest.raises(ValueError, match=r"asks 8.0 CPUs per replica; its pods have 4"):
        tier_shape(tgi("t", 1, tuning={"cpus_per_replica": 8}), settings, GPU)


def test_head_and_router_take_the_overlays_size_unless_configured() -> None:
    assert (head_shape(kube(), GPU).cpu, head_shape(kube(), GPU).memory) == (
        GPU.head_cpu,
        GPU.head_memory,
    )
    settings = kube(router={"cpu": "4", "memory": "8Gi", "priority_class": "edge",
                            "tolerations": [{"operator": "Exists"}]})  # fmt: skip
    router = router_shape(settings, GPU)
    assert (router.cpu, router.memory, router.gpus, router.priority_class) == (
        "4", "8Gi", 0, "edge",
    )  # fmt: skip
    assert router.tolerations == ({"operator": "Exists"},)


def test_the_config_refuses_unknown_tiers_and_bad_quantities() -> None:
    tiers = [{"name": "t"}]
    with pytest.raises(ValueError, match=r"kubernetes\.tiers: 'x' is not one of the tiers"):
        AppConfig.model_validate({"tiers": tiers, "kubernetes": {"tiers": [{"tier": "x"}]}})
    with pytest.raises(ValueError, match="a tier is listed twice"):
        AppConfig.model_validate(
            {"tiers": tiers, "kubernetes": {"tiers": [{"tier": "t"}, {"tier": "t"}]}}
        )
    for bad in ("8 GiB", "lots", "64gi"):
        with pytest.raises(ValueError, match=r"kubernetes\.head\.memory"):
            AppConfig.model_validate({"tiers": tiers, "kubernetes": {"head": {"memory": bad}}})
