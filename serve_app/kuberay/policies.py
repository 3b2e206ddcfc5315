"""The NetworkPolicies: who may reach the Ray pods on which port."""

from __future__ import annotations

from typing import Any

from .overlays import Overlay
from .pods import DASHBOARD_PORT, METRICS_PORT, RAY_POD_LABELS, SERVE_PORT

OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}


def network_policies(overlay: Overlay) -> list[dict[str, Any]]:
    """Ingress to the Ray pods: Serve's HTTP port from anywhere (API keys guard it), the
    metrics port from the monitoring namespace, the dashboard (Serve's REST API) from the
    KubeRay operator's pods in its own namespace (both selectors in one peer: a pod with the
    operator's label in any other namespace stays out), and every port from the cluster's own
    pods."""
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
                    "from": [{"namespaceSelector": {"matchLabels": {
                                  "kubernetes.io/metadata.name": overlay.operator_namespace}},
                              "podSelector": {"matchLabels": dict(OPERATOR_LABELS)}}],
                    "ports": [{"port": DASHBOARD_PORT, "protocol": tcp}],
                },
            ],
        },
    }  # fmt: skip
    return [ray]
