"""The KubeRay manifests: rendered from configs/, valid against KubeRay's own CRDs."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.kuberay import render_file
from serve_app.serve_config import source_config
from tests.crd import KUBERNETES_VERSION, validator

ROOT = Path(__file__).resolve().parents[3]
OVERLAYS = {"gpu": "configs/src/gpu.yaml", "local": "configs/src/local.yaml"}


def kustomize(path: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (client) is needed to render the overlays"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / path)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def rayservice(overlay: str) -> dict[str, Any]:
    (service,) = [d for d in kustomize(f"kuberay/overlays/{overlay}") if d["kind"] == "RayService"]
    return service


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_committed_manifest_is_what_the_config_renders(overlay: str) -> None:
    committed = (ROOT / "kuberay" / "overlays" / overlay / "rayservice.yaml").read_text()
    assert committed == render_file(Path(OVERLAYS[overlay]), overlay), (
        f"kuberay/overlays/{overlay}/rayservice.yaml is stale: run "
        f"python -m serve_app.kuberay render {OVERLAYS[overlay]} --overlay {overlay}"
    )


@pytest.mark.parametrize("path", ["kuberay/overlays/gpu", "kuberay/overlays/local",
                                  "kuberay/overlays/gpu-ha", "kuberay/overlays/gpu-gateway",
                                  "kuberay/monitoring"])  # fmt: skip
def test_kustomize_renders(path: str) -> None:
    kinds = {doc["kind"] for doc in kustomize(path)}
    assert kinds, path


ALL_OVERLAYS = ["gpu", "local", "gpu-ha", "gpu-gateway"]
CUSTOM_GROUPS = ("ray.io/", "gateway.networking.k8s.io/", "monitoring.coreos.com/")


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_kubernetes_object_is_strictly_valid(overlay: str) -> None:
    """Kubernetes' own kinds (PodDisruptionBudget, Ingress, Job, NetworkPolicy, ...) against
    Kubernetes' schemas, unknown fields being errors as with `kubectl apply`'s strict
    validation; the RayService against KubeRay's CRD (below)."""
    checked = set()
    for doc in kustomize(f"kuberay/overlays/{overlay}"):
        if not doc["apiVersion"].startswith(CUSTOM_GROUPS):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked.add(doc["kind"])
    assert {"PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} <= checked


def test_strict_validation_refuses_an_unknown_field() -> None:
    (budget, *_) = [d for d in kustomize("kuberay/overlays/local")
                    if d["kind"] == "PodDisruptionBudget"]  # fmt: skip
    budget["spec"]["maxUnavailabe"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(budget, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rayservice_is_valid_against_the_crd(overlay: str) -> None:
    validator().validate(rayservice(overlay))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_serve_config_v2_passes_serve_and_our_config(overlay: str) -> None:
    service = rayservice(overlay)
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    config = source_config(serve_config)
    apps = {app["name"]: app for app in serve_config["applications"]}
    assert set(apps) == {"llm", *(f"tier-{t.name}" for t in config.tiers)}
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for tier in config.tiers:
        # the tier's own application is pinned to its group
        assert apps[f"tier-{tier.name}"]["args"]["tier"]["ray_resources"] == tier.ray_resources
        group = groups[f"tier-{tier.name}"]
        assert (group["minReplicas"], group["maxReplicas"]) == (
            tier.replicas.min,
            tier.replicas.max,
        )
        advertised = yaml.safe_load(group["rayStartParams"]["resources"].strip("'"))
        assert advertised == {k: int(v) for k, v in tier.ray_resources.items()}
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        expected_gpus = tier.gpus_per_replica if overlay == "gpu" else None
        assert limits.get("nvidia.com/gpu") == expected_gpus


def _broken(change: str) -> dict[str, Any]:
    service = copy.deepcopy(rayservice("local"))
    cluster = service["spec"]["rayClusterConfig"]
    if change == "unknown field":
        service["spec"]["serveConfig"] = "typo for serveConfigV2"
    elif change == "rayStartParams not strings":
        cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    elif change == "worker group without template":
        del cluster["workerGroupSpecs"][0]["template"]
    elif change == "container without name":
        del cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    elif change == "replicas as text":
        cluster["workerGroupSpecs"][0]["maxReplicas"] = "two"
    return service


@pytest.mark.parametrize("change", ["unknown field", "rayStartParams not strings",
                                    "worker group without template", "container without name",
                                    "replicas as text"])  # fmt: skip
def test_broken_manifests_are_rejected(change: str) -> None:
    with pytest.raises(ValidationError):
        validator().validate(_broken(change))


# -- what a security review reads ----------------------------------------------------------------


def pods(overlay: str) -> dict[str, dict[str, Any]]:
    """Every pod spec an overlay makes: the RayService's head and groups."""
    docs = kustomize(f"kuberay/overlays/{overlay}")
    assert not [d for d in docs if d["kind"] in ("Job", "Pod", "Deployment")]
    found = {}
    for doc in docs:
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            found["head"] = cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                found[group["groupName"]] = group["template"]["spec"]
    return found


def mounts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mount path -> (mount + its volume) for the pod's main container."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: {**m, "volume": volumes[m["name"]]}
            for m in spec["containers"][0]["volumeMounts"]}  # fmt: skip


def secret_mounts(spec: dict[str, Any]) -> set[str]:
    return {m["volume"]["secret"]["secretName"] for m in mounts(spec).values()
            if "secret" in m["volume"]}  # fmt: skip


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_nothing_secret_is_in_any_environment(overlay: str) -> None:
    for name, spec in pods(overlay).items():
        for container in spec["containers"] + spec.get("initContainers", []):
            for env in container.get("env", []):
                assert "valueFrom" not in env, (name, env)
                assert (
                    "TOKEN" not in env["name"]
                    or env["name"].endswith("_PATH")
                    or (env["name"] == "RAY_AUTH_TOKEN" and env["value"] == "")
                ), (name, env)
            assert "envFrom" not in container


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_each_secret_is_mounted_only_where_it_is_read(overlay: str) -> None:
    found = pods(overlay)
    for name, spec in found.items():
        expected = {"ray-auth-token"}
        if name == "router":
            expected.add("serve-app-api-keys")
        if name.startswith("tier-"):
            expected.add("hf-token")  # its replica fills the model cache, or its engine downloads
        assert secret_mounts(spec) == expected, name
        for mount in mounts(spec).values():
            if "secret" in mount["volume"]:
                assert mount["readOnly"] and mount["volume"]["secret"]["defaultMode"] == 0o440


def test_the_router_reads_its_keys_file_where_the_router_group_mounts_it() -> None:
    service = rayservice("gpu")
    config = source_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.router.api_keys is not None and config.router.api_keys.file
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    router = groups["router"]
    assert Path(config.router.api_keys.file).parent.as_posix() in mounts(router["template"]["spec"])
    advertised = yaml.safe_load(router["rayStartParams"]["resources"].strip("'"))
    assert advertised == {k: int(v) for k, v in config.router.ray_resources.items()}
    assert router["rayStartParams"]["num-cpus"] == "0"
    assert router["minReplicas"] == router["maxReplicas"] == config.router.replicas


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_ray_token_auth_reads_the_token_from_the_mounted_secret(overlay: str) -> None:
    cluster = rayservice(overlay)["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}
    for spec in pods(overlay).values():
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == ""
        assert Path(env["RAY_AUTH_TOKEN_PATH"]).parent.as_posix() in mounts(spec)
    sidecar = {e["name"]: e.get("value") for e in cluster["autoscalerOptions"]["env"]}
    assert sidecar["RAY_AUTH_TOKEN"] == "" and sidecar["RAY_AUTH_TOKEN_PATH"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_container_is_restricted_with_explicit_writable_mounts(overlay: str) -> None:
    autoscaler = rayservice(overlay)["spec"]["rayClusterConfig"]["autoscalerOptions"]
    contexts = [autoscaler["securityContext"]]
    for name, spec in pods(overlay).items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        # the head's autoscaler scales groups; tier replicas post Events on their pod
        assert spec["automountServiceAccountToken"] is (name == "head" or name.startswith("tier"))
        contexts += [
            c["securityContext"] for c in spec["containers"] + spec.get("initContainers", [])
        ]
        writable = {p for p, m in mounts(spec).items() if not m.get("readOnly")}
        expected = {"/tmp", "/tmp/ray", "/dev/shm"}
        if name.startswith("tier-") and overlay == "gpu":
            expected.add("/models")  # its replicas fill the model cache
        assert writable == expected, name
    for context in contexts:
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000


def test_tier_pods_fill_the_model_cache_and_name_no_model() -> None:
    """The cache is mounted where every tier's replicas fill it; the engines read it offline.
    No init container, no Job: nothing outside `serveConfigV2` names a model."""
    found = pods("gpu")
    service = rayservice("gpu")
    config = source_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    cluster = yaml.safe_dump(service["spec"]["rayClusterConfig"])
    for tier in config.tiers:
        spec = found[f"tier-{tier.name}"]
        cache = mounts(spec)["/models"]
        assert not cache.get("readOnly")
        assert cache["volume"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
        assert "initContainers" not in spec
        env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
        assert env["HF_HUB_OFFLINE"] == "1" and env["SERVE_APP_MODEL_CACHE"] == "/models"
        assert env["HUGGINGFACE_HUB_CACHE"] == "/models/hub"
        assert tier.engine.model_id not in cluster
    assert "/models" not in mounts(found["head"]) and "/models" not in mounts(found["router"])


def network_policy(overlay: str) -> dict[str, Any]:
    docs = kustomize(f"kuberay/overlays/{overlay}")
    (policy,) = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "llm-ray"
    ]
    return policy["spec"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_from_outside_the_cluster_only_serve_metrics_and_the_operator_get_in(overlay: str) -> None:
    spec = network_policy(overlay)
    ray_labels = spec["podSelector"]["matchLabels"]
    cluster = rayservice(overlay)["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert ray_labels.items() <= group["template"]["metadata"]["labels"].items()
    open_ports = {}
    for rule in spec["ingress"]:
        ports = tuple(p["port"] for p in rule.get("ports", []))
        sources = rule.get("from")
        if sources == [{"podSelector": {"matchLabels": ray_labels}}]:
            assert not ports  # the cluster's own pods: every Ray port
            continue
        assert ports, rule  # everyone else: named ports only
        open_ports[ports] = sources
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    operator = {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    # the operator's pods in the operator's namespace only, not a pod so labelled anywhere
    operators = {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
    assert open_ports == {
        (8000,): None,
        (8080,): [{"namespaceSelector": monitoring}],
        (8265,): [{"namespaceSelector": operators, "podSelector": operator}],
    }


# -- pod sizes and disruption safety ----------------------------------------------------------


def test_gpu_tiers_are_sized_from_the_config_per_gpu() -> None:
    """configs/gpu.yaml: the 1-GPU tiers derived (8 CPUs, 80Gi; TGI's and vLLM's alike), the
    4-GPU one 32 CPUs derived and its memory as the config's `kubernetes` section says."""
    groups = rayservice("gpu")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    sizes = {}
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        sizes[group["groupName"]] = (limits["cpu"], limits["memory"], limits.get("nvidia.com/gpu"))
        if limits.get("nvidia.com/gpu"):
            assert group["rayStartParams"]["num-cpus"] == limits["cpu"]
    assert sizes["tier-small"] == sizes["tier-vllm-small"] == ("8", "80Gi", 1)
    assert sizes["tier-large"] == ("32", "320Gi", 4)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_kubernetes_section_stays_out_of_the_applications_args(overlay: str) -> None:
    serve_config = rayservice(overlay)["spec"]["serveConfigV2"]
    assert "kubernetes" not in serve_config  # neither in a tier's args nor in the router's
    assert len(yaml.safe_load(serve_config)["applications"]) > 1


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_worker_group_has_a_budget_and_spreads(overlay: str) -> None:
    docs = kustomize(f"kuberay/overlays/{overlay}")
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    cluster = rayservice(overlay)["spec"]["rayClusterConfig"]
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    for group in cluster["workerGroupSpecs"]:
        labels = group["template"]["metadata"]["labels"]
        budget = budgets.pop(f"llm-{group['groupName']}")
        assert budget["maxUnavailable"] == 1
        selector = budget["selector"]["matchLabels"]
        assert selector.items() <= labels.items() and not selector.items() <= head_labels.items()
        others = [g for g in cluster["workerGroupSpecs"] if g is not group]
        assert not any(selector.items() <= g["template"]["metadata"]["labels"].items()
                       for g in others)  # fmt: skip
        spread = group["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
        }
        assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)
    assert not budgets  # none for the head: one pod, restarted in place


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_the_hf_token_reaches_every_pod_that_downloads_weights_as_a_file(overlay: str) -> None:
    """Tier pods download: their replicas into the model cache, or without one their engines.
    The token is a file there (a rotated Secret reaches the next fill or engine start),
    optional."""
    for name, spec in pods(overlay).items():
        downloads = name.startswith("tier-")
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        token = [m for m in mounts(spec).values()
                 if m["volume"].get("secret", {}).get("secretName") == "hf-token"]  # fmt: skip
        assert bool(token) == downloads, name
        if downloads:
            (mount,) = token
            assert mount["volume"]["secret"]["optional"] is True
            assert Path(env["HF_TOKEN_PATH"]).parent.as_posix() == mount["mountPath"]
        else:
            assert "HF_TOKEN_PATH" not in env, name


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_tier_pods_may_only_create_events_on_the_kubernetes_api(overlay: str) -> None:
    docs = kustomize(f"kuberay/overlays/{overlay}")
    (role,) = [
        d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "serve-app-events"
    ]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "serve-app-events"}]
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert account["automountServiceAccountToken"] is False
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        is_tier = group["groupName"] != "router"
        assert spec["automountServiceAccountToken"] is is_tier, group["groupName"]
        assert (spec.get("serviceAccountName") == "serve-app-events") is is_tier
    assert "serviceAccountName" not in cluster["headGroupSpec"]["template"]["spec"]
