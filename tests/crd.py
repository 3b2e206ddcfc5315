"""KubeRay's CRDs (read from ../shared) as strict JSON Schema validators.

The API server prunes unknown fields, and `kubectl apply` (strict field validation by default)
rejects them; here every object schema that lists its properties gets `additionalProperties:
false` unless it preserves unknown fields, and `x-kubernetes-int-or-string` becomes "integer or
string".
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "refs" / "kuberay"


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def validator(kind_file: str = "ray.io_rayservices.yaml") -> Draft202012Validator:
    crd = yaml.safe_load((CRD_DIR / kind_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    # apiVersion/kind/metadata are the API server's to check; the schema leaves them open.
    return Draft202012Validator(schema)


# Kubernetes' own kinds (Ingress, PodDisruptionBudget, Job, NetworkPolicy, ...): validated
# strictly (unknown fields are errors) against this release's schemas by kubernetes-validate.
KUBERNETES_VERSION = "1.32.0"
