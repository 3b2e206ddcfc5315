"""Kubernetes Events of a replica's start-up phases (`serve_app.kube_events`): the Event's body,
where the pod's API access comes from, and one post to a real local HTTP server."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serve_app.kube_events import MAX_MESSAGE, KubeApi, KubeEvents, event_body, phase_message
from serve_app.tier.startup import Phase, ReplicaPhase

NOW = datetime.datetime(2026, 12, 7, 15, 0, 5, tzinfo=datetime.UTC)


def test_the_event_names_the_pod_the_phase_and_the_reason() -> None:
    loading = ReplicaPhase("large", "abc", Phase.LOADING, 0.0)
    body = event_body(loading, "ray-tier-large-x7", "llm", "uid-1", NOW)
    assert body["involvedObject"] == {
        "apiVersion": "v1", "kind": "Pod", "name": "ray-tier-large-x7", "namespace": "llm",
        "uid": "uid-1",
    }  # fmt: skip
    assert body["metadata"] == {"generateName": "ray-tier-large-x7.", "namespace": "llm"}
    assert (body["reason"], body["type"]) == ("TierLoading", "Normal")
    assert body["message"] == (
        "tier large replica abc has started its engine, which is loading the model"
    )
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-12-07T15:00:05Z"
    failed = ReplicaPhase("large", "abc", Phase.FAILED, 0.0, "exited with code 1\n" + "x" * 3000)
    body = event_body(failed, "p", "llm", None, NOW)
    assert (body["reason"], body["type"]) == ("TierFailed", "Warning")
    assert "uid" not in body["involvedObject"]
    assert len(body["message"]) <= MAX_MESSAGE
    assert body["message"].startswith("tier large replica abc failed to start: exited with code 1")
    assert phase_message(ReplicaPhase("s", "r", Phase.READY, 0.0)).endswith("serves the model")


def test_only_a_pod_with_a_token_posts(tmp_path: Path) -> None:
    assert KubeApi.in_cluster({}, tmp_path) is None
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "SERVE_APP_POD_NAME": "ray-worker-1"}
    assert KubeApi.in_cluster(env, tmp_path) is None  # no token mounted
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "namespace").write_text("llm")
    (tmp_path / "ca.crt").write_text("")
    api = KubeApi.in_cluster(env, tmp_path)
    assert api == KubeApi("https://10.0.0.1:443", "tok", str(tmp_path / "ca.crt"), "llm",
                          "ray-worker-1", token_file=tmp_path / "token")  # fmt: skip
    # Kubernetes rotates a bound token in place: each post reads the file again
    (tmp_path / "token").write_text("rotated\n")
    assert api is not None and api.bearer() == "rotated"


class Recorder(BaseHTTPRequestHandler):
    posts: list[tuple[str, str, dict[str, Any]]] = []
    status = 201

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).posts.append((self.path, self.headers["authorization"], body))
        self.send_response(type(self).status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.posts = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_event_is_posted_with_the_token_and_a_refusal_is_only_logged(api_server: str) -> None:
    events = KubeEvents(KubeApi(api_server, "tok", None, "llm", "pod-a"))
    ready = ReplicaPhase("small", "r", Phase.READY, 0.0)
    assert events.post(ready)
    ((path, auth, body),) = Recorder.posts
    assert path == "/api/v1/namespaces/llm/events" and auth == "Bearer tok"
    assert body["reason"] == "TierReady" and body["involvedObject"]["name"] == "pod-a"
    Recorder.status = 403
    try:
        assert not events.post(ready)
        assert not events.post(ready)
    finally:
        Recorder.status = 201
    assert not KubeEvents(KubeApi("http://127.0.0.1:9", "t", None, "n", "p")).post(ready)
