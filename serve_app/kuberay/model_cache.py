"""The model cache: the Job that fills it with every tier's weights, the marker it writes per
model (or, when a download fails, why), and the init container with which a serving pod waits for
its model's marker and fails visibly, with the reason, when the fill did."""

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
FILL_SELECTOR = ",".join(f"{k}={v}" for k, v in FILL_POD_LABELS.items())
# How long a serving pod waits for its model before it fails visibly (and, restarted with
# back-off, waits again): the largest models take this long to download.
FILL_WAIT_S = 3600
# Lines of a failed download's output kept beside the marker, for the serving pods to show.
FAILURE_LINES = 20


def _models(tiers: list[TierConfig]) -> list[tuple[str, str | None]]:
    return sorted({(t.engine.model_id, t.engine.revision) for t in tiers}, key=str)


def fill_marker(model: str, revision: str | None, cache: str = MODEL_CACHE) -> str:
    """The file the fill Job writes once a model's weights are in the cache, named after the
    model and revision: serving pods wait for their model's marker."""
    digest = hashlib.sha256(json.dumps([model, revision]).encode()).hexdigest()[:12]
    return f"{cache}/.serve-app/filled-{digest}"


def failed_marker(marker: str) -> str:
    """The file a failed fill writes beside the model's marker: why it failed."""
    return f"{marker}.failed"


def _say(text: str) -> str:
    return f"echo {shlex.quote(text)} >&2"


def wait_script(marker: str, model: str, limit_s: int = FILL_WAIT_S, poll_s: int = 10) -> str:
    """Wait for the model's marker. Exit 1 with the reason when the fill wrote why it failed,
    or when nothing came within `limit_s`: the pod then shows `Init:Error` (later
    `Init:CrashLoopBackOff`, retried with back-off) and the reason as the container's
    termination message, instead of waiting in Init without a word."""
    failed = failed_marker(marker)
    see = f"kubectl logs -l {FILL_SELECTOR} --tail 50"
    return "\n".join([
        "waited=0",
        f"until [ -f {marker} ]; do",
        f"  if [ -f {failed} ]; then",
        "    " + _say(f"filling the model cache with {model} failed ({see}):"),
        f"    cat {failed} >&2",
        "    exit 1",
        "  fi",
        f"  if [ \"$waited\" -ge {limit_s} ]; then",
        "    " + _say(f"{model} is not in the model cache after {limit_s}s: is the fill Job "
                     f"running? (kubectl get jobs -l {FILL_SELECTOR})"),
        "    exit 1",
        "  fi",
        f"  echo {shlex.quote(f'waiting for {model} in the model cache')}",
        f"  sleep {poll_s}",
        f"  waited=$((waited + {poll_s}))",
        "done",
    ]) + "\n"  # fmt: skip


def wait_for_cache(image: str, marker: str, model: str) -> dict[str, Any]:
    return {
        "name": "wait-model-cache",
        "image": image,
        "command": ["/bin/sh", "-c", wait_script(marker, model)],
        "resources": container_resources("100m", "64Mi"),
        "securityContext": CONTAINER_SECURITY,
        # the last lines it wrote become the pod's status message when it fails
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "models", "mountPath": MODEL_CACHE, "readOnly": True}],
    }


def fill_steps(
    model: str, revision: str | None, cache: str = MODEL_CACHE, log: str = "/tmp/fill.log"
) -> list[str]:
    """Download one model; on failure, write why beside its marker (its serving pods show it)
    and exit 1 (the Job retries); on success, its marker."""
    args = ["text-generation-server", "download-weights", model]
    if revision:
        args += ["--revision", revision]
    marker = fill_marker(model, revision, cache)
    failed = failed_marker(marker)
    status = f"{log}.status"
    return [
        f"rm -f {failed}",
        f'{{ rc=0; {shlex.join(args)} || rc=$?; echo "$rc" > {status}; }} 2>&1 | tee {log}',
        f"rc=$(cat {status})",
        'if [ "$rc" != 0 ]; then',
        f'  {{ echo "{shlex.join(args)} failed (exit $rc) at $(date -u +%Y-%m-%dT%H:%M:%SZ); '
        f'its last output:"; tail -n {FAILURE_LINES} {log}; }} > {failed}',
        f"  cat {failed} >&2",
        "  exit 1",
        "fi",
        f"touch {marker}",
    ]


def fill_job(config: AppConfig, overlay: Overlay, image: str) -> dict[str, Any]:
    """Download every tier's weights into the model cache with TGI's own downloader, then
    write each model's marker, which its serving pods wait for. Idempotent: files already in the
    cache are kept, and a finished Job is not run again; a new model set is a new Job (its name
    carries their hash)."""
    steps = ["set -eu", f"mkdir -p {MODEL_CACHE}/.serve-app"]
    markers = []
    for model, revision in _models(list(config.tiers)):
        markers.append(fill_marker(model, revision))
        steps += fill_steps(model, revision)
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
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
