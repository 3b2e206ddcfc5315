"""What a security review asks of every pod: secrets mounted as files only where they are read,
Ray's token read from its file, Pod Security "restricted" settings, and the one Kubernetes API
right a serving pod has (creating Events)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE_UID = 10001  # the image's own user (kuberay/Dockerfile)


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
# The Hugging Face token: only in the pods that download weights, the tier pods (their replicas
# fill the model cache, or without one their engines download). Optional: public models need none.
HF_TOKEN = SecretFile("hf-token", "hf-token", "token", "/etc/hf-token", optional=True)

# Token auth with the token read from a file. KubeRay would otherwise add `RAY_AUTH_TOKEN` from
# the Secret as an environment variable, which every Ray worker process (and `ray job submit --
# env`) would see; it adds it only where the variable is not set, and Ray reads the token from
# `RAY_AUTH_TOKEN_PATH` when `RAY_AUTH_TOKEN` is empty.
TOKEN_AUTH_ENV = [
    {"name": "RAY_AUTH_MODE", "value": "token"},
    {"name": "RAY_AUTH_TOKEN", "value": ""},
    {"name": "RAY_AUTH_TOKEN_PATH", "value": RAY_TOKEN.path},
]

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

# The tier pods' service account: its replicas post their start-up phases as Events on their own
# pod (`serve_app.kube_events`), and may do nothing else with the Kubernetes API.
EVENTS_ACCOUNT = "serve-app-events"


def events_account() -> list[dict[str, Any]]:
    """The ServiceAccount, a Role that may only create Events, and their RoleBinding (all in the
    namespace the overlay deploys to)."""
    meta = {"name": EVENTS_ACCOUNT}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta),
         "automountServiceAccountToken": False},  # mounted only where a pod asks for it
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta),
         "rules": [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": dict(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": EVENTS_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": EVENTS_ACCOUNT}]},
    ]  # fmt: skip
