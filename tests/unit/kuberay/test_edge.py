"""The TLS edge: its limits agree with the router's, the committed files are what the config
renders, and the overlays that use it are valid (Kubernetes' own schemas, strictly, and
KubeRay's CRD)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serve_app.config import AppConfig
from serve_app.kuberay.edge import (
    BODY_SLACK_BYTES,
    DEADLINE_SLACK_S,
    SERVE_SERVICE,
    edge_limits,
    gateway,
    http_route,
    ingress,
)
from serve_app.kuberay.pods import SERVE_PORT
from serve_app.kuberay.render import render_edge_file
from tests.crd import KUBERNETES_VERSION, validator

from .test_render import ROOT, kustomize

EDGE_FILES = {"ingress": "kuberay/components/ingress/ingress.yaml",
              "gateway": "kuberay/components/gateway/gateway.yaml"}  # fmt: skip
HA_OVERLAYS = {"gpu-ha": "Ingress", "gpu-gateway": "HTTPRoute"}


def config(**router_tuning: Any) -> AppConfig:
    return AppConfig.model_validate({
        "router": {"tuning": router_tuning},
        "tiers": [
            {"name": "a", "request_timeout_s": 100, "replica_wait_timeout_s": 50},
            {"name": "b", "request_timeout_s": 200, "replica_wait_timeout_s": 20.5,
             "admission": {"max_in_flight": 4, "max_wait_s": 15}},
        ],
    })  # fmt: skip


def test_the_edge_outlasts_the_longest_request_any_tier_may_take() -> None:
    limits = edge_limits(config(max_body_bytes=1000, body_timeout_s=12.5))
    assert limits.body_bytes == 1000 + BODY_SLACK_BYTES
    assert limits.body_timeout_s == 13
    # tier b: 15 s for a turn + 20.5 s for a replica + 200 s to answer, after 12.5 s of body
    assert limits.request_timeout_s == 248 + DEADLINE_SLACK_S


def test_the_ingress_carries_the_limits_and_streams() -> None:
    app = config(max_body_bytes=3_000_000, body_timeout_s=30)
    limits = edge_limits(app)
    found = ingress(app)
    notes = found["metadata"]["annotations"]
    assert notes["cert-manager.io/cluster-issuer"]
    body = int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].removesuffix("k")) * 1024
    assert limits.body_bytes <= body < limits.body_bytes + 1024
    assert body > app.router.tuning.max_body_bytes  # the router's own 413 answers first
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == str(limits.request_timeout_s)
    assert notes["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "30"
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    (tls,) = found["spec"]["tls"]
    (rule,) = found["spec"]["rules"]
    assert tls["hosts"] == [rule["host"]] and tls["secretName"]
    (path,) = rule["http"]["paths"]
    assert path["backend"] == {"service": {"name": SERVE_SERVICE, "port": {"number": SERVE_PORT}}}


def test_the_route_waits_as_long_as_a_request_may_last_on_the_gateways_tls_listener() -> None:
    app = config()
    route, gate = http_route(app), gateway()
    (rule,) = route["spec"]["rules"]
    expected = f"{edge_limits(app).request_timeout_s}s"
    assert rule["timeouts"] == {"request": expected, "backendRequest": expected}
    assert rule["backendRefs"] == [{"name": SERVE_SERVICE, "port": SERVE_PORT}]
    (parent,) = route["spec"]["parentRefs"]
    (listener,) = gate["spec"]["listeners"]
    assert (parent["name"], parent["sectionName"]) == (gate["metadata"]["name"], listener["name"])
    assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate"
    assert route["spec"]["hostnames"] == [listener["hostname"]]
    assert gate["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    (cert,) = listener["tls"]["certificateRefs"]
    assert cert["name"] == "llm-tls"


@pytest.mark.parametrize(("kind", "path"), EDGE_FILES.items())
def test_committed_edge_is_what_the_config_renders(kind: str, path: str) -> None:
    assert (ROOT / path).read_text() == render_edge_file(Path("configs/gpu.yaml"), kind), (
        f"{path} is stale: run python -m serve_app.kuberay edge configs/gpu.yaml --kind {kind}"
    )


# Gateway API's Duration (GEP-2257): up to four whole numbers of h, m, s or ms.
DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")


def test_the_routes_timeouts_are_gateway_api_durations() -> None:
    (rule,) = http_route(config())["spec"]["rules"]
    assert all(DURATION.match(t) for t in rule["timeouts"].values())


def test_the_ingress_is_strictly_valid() -> None:
    kubernetes_validate.validate(ingress(config()), KUBERNETES_VERSION, strict=True)
    broken = ingress(config())
    broken["spec"]["rules"][0]["http"]["paths"][0]["backend"]["serviceName"] = "llm"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def docs_of(overlay: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in kustomize(f"kuberay/overlays/{overlay}")}


@pytest.mark.parametrize(("overlay", "edge"), HA_OVERLAYS.items())
def test_the_ha_overlays_add_gcs_fault_tolerance_and_an_edge(overlay: str, edge: str) -> None:
    docs = docs_of(overlay)
    service = docs["RayService"]
    validator().validate(service)
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["backend"] == "redis" and options["redisAddress"]
    assert options["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": "serve-app-redis", "key": "password"}}
    }
    # the old and the new cluster of an upgrade must not share one storage namespace
    assert "externalStorageNamespace" not in options
    assert edge in docs and "PodDisruptionBudget" in docs
    gpu = {d["kind"]: d for d in kustomize("kuberay/overlays/gpu")}
    cluster = dict(service["spec"]["rayClusterConfig"])
    del cluster["gcsFaultToleranceOptions"]
    assert cluster == gpu["RayService"]["spec"]["rayClusterConfig"]


def test_the_gateway_overlay_routes_to_the_gateway_it_adds() -> None:
    docs = docs_of("gpu-gateway")
    (parent,) = docs["HTTPRoute"]["spec"]["parentRefs"]
    assert parent["name"] == docs["Gateway"]["metadata"]["name"]
    assert yaml.safe_dump(docs["HTTPRoute"]).count(SERVE_SERVICE) == 1
