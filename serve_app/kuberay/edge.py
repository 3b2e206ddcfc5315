"""The TLS edge in front of the Serve service: an Ingress (ingress-nginx) or a Gateway API
Gateway and HTTPRoute, with a cert-manager certificate, and limits that agree with the router's:
the edge never cuts off a request the router would still answer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import AppConfig
from .pods import SERVE_PORT

SERVE_SERVICE = "llm-serve-svc"  # KubeRay's Service for the RayService `llm`'s Serve proxies
HOST = "llm.example.com"
TLS_SECRET = "llm-tls"
CLUSTER_ISSUER = "letsencrypt"
INGRESS_CLASS = "nginx"
GATEWAY_CLASS = "example-gateway-class"  # the cluster's own, e.g. of Envoy Gateway or Istio
# Room above the router's body limit: a body the router refuses gets the router's own 413 (in the
# API's error shape) rather than the edge's HTML page; only far larger ones stop at the edge.
BODY_SLACK_BYTES = 1 << 20
# Room above the longest a request may last inside the stack, for the hops before and after.
DEADLINE_SLACK_S = 10


@dataclass(frozen=True)
class EdgeLimits:
    """What the edge allows one request: body bytes, seconds to send it, seconds in all."""

    body_bytes: int
    body_timeout_s: int
    request_timeout_s: int


def edge_limits(config: AppConfig) -> EdgeLimits:
    """From the router's limits: the body limit plus `BODY_SLACK_BYTES`; the router's body
    timeout; and the longest a request may last, over every tier: the body's arrival, the wait
    for an admission turn, the wait for a replica and the request's own timeout."""
    router = config.router.tuning

    def lifetime(tier: Any) -> float:
        admission = tier.admission.max_wait_s if tier.admission else 0.0
        return admission + tier.replica_wait_timeout_s + tier.request_timeout_s

    longest = router.body_timeout_s + max(lifetime(t) for t in config.tiers)
    return EdgeLimits(
        body_bytes=router.max_body_bytes + BODY_SLACK_BYTES,
        body_timeout_s=math.ceil(router.body_timeout_s),
        request_timeout_s=math.ceil(longest) + DEADLINE_SLACK_S,
    )


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "serve-app", "app.kubernetes.io/component": "edge"}


def ingress(config: AppConfig) -> dict[str, Any]:
    """An ingress-nginx Ingress for HOST, TLS from cert-manager's CLUSTER_ISSUER, answers
    streamed as they come (no response buffering), and the router's limits."""
    limits = edge_limits(config)
    annotations = {
        "cert-manager.io/cluster-issuer": CLUSTER_ISSUER,
        "nginx.ingress.kubernetes.io/proxy-body-size": f"{math.ceil(limits.body_bytes / 1024)}k",
        "nginx.ingress.kubernetes.io/proxy-read-timeout": str(limits.request_timeout_s),
        "nginx.ingress.kubernetes.io/proxy-send-timeout": str(limits.body_timeout_s),
        # Server-sent events: every token as it comes, not once a buffer fills.
        "nginx.ingress.kubernetes.io/proxy-buffering": "off",
        "nginx.ingress.kubernetes.io/ssl-redirect": "true",
    }
    backend = {"service": {"name": SERVE_SERVICE, "port": {"number": SERVE_PORT}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "llm", "labels": _labels(), "annotations": annotations},
        "spec": {
            "ingressClassName": INGRESS_CLASS,
            "tls": [{"hosts": [HOST], "secretName": TLS_SECRET}],
            "rules": [{"host": HOST, "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": backend},
            ]}}],
        },
    }  # fmt: skip


def gateway() -> dict[str, Any]:
    """A Gateway with one HTTPS listener for HOST; cert-manager's gateway support issues its
    certificate into TLS_SECRET."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "llm", "labels": _labels(),
                     "annotations": {"cert-manager.io/cluster-issuer": CLUSTER_ISSUER}},
        "spec": {
            "gatewayClassName": GATEWAY_CLASS,
            "listeners": [{
                "name": "https",
                "hostname": HOST,
                "port": 443,
                "protocol": "HTTPS",
                "tls": {"mode": "Terminate",
                        "certificateRefs": [{"kind": "Secret", "name": TLS_SECRET}]},
                "allowedRoutes": {"namespaces": {"from": "Same"}},
            }],
        },
    }  # fmt: skip


def http_route(config: AppConfig) -> dict[str, Any]:
    """Every path of HOST to the Serve service, within the request's longest lifetime. Gateway
    API has no body-size field: the router's own limit (413) applies."""
    limits = edge_limits(config)
    timeout = f"{limits.request_timeout_s}s"
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "llm", "labels": _labels()},
        "spec": {
            "parentRefs": [{"name": "llm", "sectionName": "https"}],
            "hostnames": [HOST],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [{"name": SERVE_SERVICE, "port": SERVE_PORT}],
                "timeouts": {"request": timeout, "backendRequest": timeout},
            }],
        },
    }  # fmt: skip


EDGES = {"ingress": lambda config: [ingress(config)],
         "gateway": lambda config: [gateway(), http_route(config)]}  # fmt: skip
