"""Kubernetes Events on the pod a tier replica runs in: its start-up phases
(`serve_app.tier.startup`), so that `kubectl describe pod` and `kubectl get events` tell a pod
that is loading its model from one that is stuck.

Only in a pod: where `KUBERNETES_SERVICE_HOST` is set and the service account's token is mounted
(the KubeRay manifests give the Ray pods an account that may create Events, and nothing more:
`serve_app.kuberay.security`). Posting happens on a thread of its own, within a few seconds;
an API server that refuses is logged once and otherwise ignored.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .tier.startup import Phase, ReplicaPhase

logger = logging.getLogger("ray.serve")

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A pod's host name is its name; these override it (and add its uid) where a pod sets them.
POD_NAME_ENV = "SERVE_APP_POD_NAME"
POD_UID_ENV = "SERVE_APP_POD_UID"
COMPONENT = "serve-app"
MAX_MESSAGE = 1024
POST_TIMEOUT_S = 5.0

REASONS = {
    Phase.STARTING: "TierStarting",
    Phase.FILLING_CACHE: "TierFillingCache",
    Phase.LOADING: "TierLoading",
    Phase.READY: "TierReady",
    Phase.FAILED: "TierFailed",
}


def phase_message(phase: ReplicaPhase) -> str:
    """What the Event says: the tier, the replica and its phase; a failure's reason after it."""
    text = {
        Phase.STARTING: "is starting",
        Phase.FILLING_CACHE: "is filling its model cache",
        Phase.LOADING: "has started its engine, which is loading the model",
        Phase.READY: "is ready: its engine serves the model",
        Phase.FAILED: "failed to start",
    }[phase.phase]
    message = f"tier {phase.tier} replica {phase.replica} {text}"
    if phase.reason:
        message += f": {phase.reason}"
    if len(message) > MAX_MESSAGE:  # the end holds the engine's last output
        message = message[: MAX_MESSAGE // 2 - 5] + " ... " + message[-(MAX_MESSAGE // 2) :]
    return message


def event_body(
    phase: ReplicaPhase, pod: str, namespace: str, uid: str | None, now: datetime.datetime
) -> dict[str, Any]:
    """A core/v1 Event about pod `pod` for one replica's phase."""
    stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    involved = {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": namespace}
    if uid:
        involved["uid"] = uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{pod}.", "namespace": namespace},
        "involvedObject": involved,
        "reason": REASONS[phase.phase],
        "message": phase_message(phase),
        "type": "Warning" if phase.phase is Phase.FAILED else "Normal",
        "source": {"component": COMPONENT, "host": pod},
        "reportingComponent": COMPONENT,
        "reportingInstance": pod,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


@dataclass(frozen=True)
class KubeApi:
    """Where and how to post: the API server's URL, the token, the CA (None: plain HTTP)."""

    url: str
    token: str
    ca_file: str | None
    namespace: str
    pod: str
    uid: str | None = None
    token_file: Path | None = None  # re-read at each post: Kubernetes rotates bound tokens

    def bearer(self) -> str:
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError:
                pass
        return self.token

    @classmethod
    def in_cluster(
        cls, environ: Mapping[str, str] = os.environ, account: Path = ACCOUNT
    ) -> KubeApi | None:
        """The pod's own API access, or None outside a pod (or without a mounted token)."""
        host = environ.get("KUBERNETES_SERVICE_HOST")
        token = account / "token"
        if not host or not token.is_file():
            return None
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host
        try:
            namespace = (account / "namespace").read_text().strip()
            secret = token.read_text().strip()
        except OSError:
            return None
        ca = account / "ca.crt"
        return cls(
            url=f"https://{host}:{port}",
            token=secret,
            ca_file=str(ca) if ca.is_file() else None,
            namespace=namespace,
            pod=environ.get(POD_NAME_ENV) or socket.gethostname(),
            uid=environ.get(POD_UID_ENV) or None,
            token_file=token,
        )


class KubeEvents:
    """Posts one Event per phase, each on a short-lived thread; failures logged once."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api
        self._warned = False

    def announce(self, phase: ReplicaPhase) -> None:
        threading.Thread(target=self.post, args=(phase,), daemon=True).start()

    def post(self, phase: ReplicaPhase) -> bool:
        """Post the Event now; whether the API server took it."""
        api = self._api
        body = event_body(
            phase, api.pod, api.namespace, api.uid, datetime.datetime.now(datetime.UTC)
        )
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=api.ca_file) if api.ca_file else True
        )
        try:
            reply = httpx.post(
                f"{api.url}/api/v1/namespaces/{api.namespace}/events",
                json=body,
                headers={"Authorization": f"Bearer {api.bearer()}"},
                verify=verify,
                timeout=POST_TIMEOUT_S,
            )
        except (httpx.HTTPError, OSError) as exc:
            self._warn(f"{type(exc).__name__}: {exc}")
            return False
        if reply.status_code >= 300:
            self._warn(f"{reply.status_code} {reply.text[:300]}")
            return False
        return True

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "a Kubernetes Event on pod %s could not be posted (%s); start-up phases are "
                "still in the replica's log and the router's status", self._api.pod, why,
            )  # fmt: skip


def pod_events() -> KubeEvents | None:
    """The pod's Events, or None outside Kubernetes."""
    api = KubeApi.in_cluster()
    return KubeEvents(api) if api is not None else None
