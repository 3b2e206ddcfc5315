"""The model cache: the Job that fills it with every tier's weights, the marker it writes per
model, and the init container with which a serving pod waits for its model's marker."""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

from ..config import AppConfig, TierConfig
from .overlays import Overlay
from .pods import CACHE_ENV, MODEL_CACHE, TMP, WRITABLE_ENV, container_resources
from .security import CONTAINER_SECURITY, HF_TOKEN, POD_SECURITY

FILL_POD_LABELS = {"app.kubernetes.io/name": "serve-app",
                   "app.kubernetes.io/component": "model-cache-fill"}  # fmt: skip


def _models(tiers: list[TierConfig]) -> list[tuple[str, str | None]]:
    return sorted({(t.engine.model_id, t.engine.revision) for t in tiers}, key=str)


def fill_marker(model: str, revision: str | None) -> str:
    """The file the fill Job writes once a model's weights are in the cache, named after the
    model and revision: serving pods wait for their model's marker."""
    digest = hashlib.sha256(json.dumps([model, revision]).encode()).hexdigest()[:12]
    return f"{MODEL_CACHE}/.serve-app/filled-{digest}"


def wait_for_cache(image: str, marker: str) -> dict[str, Any]:
    return {
        "name": "wait-model-cache",
        "image": image,
        "command": ["/bin/sh", "-c",
                    f"until [ -f {marker} ]; do echo waiting for {marker}; sleep 10; done"],
        "resources": container_resources("100m", "64Mi"),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "models", "mountPath": MODEL_CACHE, "readOnly": True}],
    }  # fmt: skip


def fill_job(config: AppConfig, overlay: Overlay, image: str) -> dict[str, Any]:
    """Download every tier's weights into the model cache with TGI's own downloader, then
    write each model's marker, which its serving pods wait for. Idempotent: files already in the
    cache are kept, and a finished Job is not run again; a new model set is a new Job (its name
    carries their hash)."""
    steps = ["set -eu", f"mkdir -p {MODEL_CACHE}/.serve-app"]
    markers = []
    for model, revision in _models(list(config.tiers)):
        args = ["text-generation-server", "download-weights", model]
        if revision:
            args += ["--revision", revision]
        markers.append(fill_marker(model, revision))
        steps += [shlex.join(args), f"touch {markers[-1]}"]
    cache = {"name": "models", "persistentVolumeClaim": {"claimName": overlay.model_cache_claim}}
    volumes = [TMP, (HF_TOKEN.as_volume(), HF_TOKEN.as_mount()),
               (cache, {"name": "models", "mountPath": MODEL_CACHE})]  # fmt: skip
    container = {
        "name": "fill",
        "image": image,
        "command": ["/bin/sh", "-c", "\n".join(steps) + "\n"],
        "env": [
            *WRITABLE_ENV,
            *CACHE_ENV,
            # huggingface_hub reads the token from this file itself.
            {"name": "HF_TOKEN_PATH", "value": HF_TOKEN.path},
        ],
        "resources": container_resources("2", "8Gi"),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [mount for _, mount in volumes],
    }
    name = "model-cache-fill-" + hashlib.sha256("".join(markers).encode()).hexdigest()[:10]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": dict(FILL_POD_LABELS)},
        "spec": {
            "backoffLimit": 6,
            "template": {
                "metadata": {"labels": dict(FILL_POD_LABELS)},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [volume for volume, _ in volumes],
                },
            },
        },
    }
