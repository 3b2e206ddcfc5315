"""`python -m serve_app.status`: the router's `/v1/status` as text, and its exit status, against
a real local HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from serve_app.status import format_status, main

NOW = 10_000.0
DOCUMENT = {
    "object": "status",
    "time": NOW,
    "tiers": [
        {"tier": "small", "state": "ready", "since": NOW - 3600, "reason": None,
         "replicas": [{"replica": "a1", "serve_state": "RUNNING", "phase": "ready",
                       "since": NOW - 3600, "reason": None},
                      {"replica": "a2", "serve_state": "STARTING", "phase": "loading",
                       "since": NOW - 95, "reason": None}]},
        {"tier": "large", "state": "failed", "since": NOW - 30,
         "reason": "engine for tier 'large' exited with code 1 during start-up. Last output:\n"
                   "'/models/missing.gguf' is neither a built-in model nor a file",
         "replicas": []},
    ],
}  # fmt: skip


def test_each_tier_its_state_replicas_and_reason() -> None:
    assert format_status(DOCUMENT, NOW).splitlines() == [
        "small  ready          for  60m  1 ready, 1 loading",
        "    replica a1: RUNNING, phase ready for 60m",
        "    replica a2: STARTING, phase loading for 95s",
        "large  failed         for  30s  no replicas",
        "    reason: engine for tier 'large' exited with code 1 during start-up. Last output:",
        "      '/models/missing.gguf' is neither a built-in model nor a file",
    ]
    assert format_status({"tiers": []}, NOW) == "no tiers"


def test_a_candidate_its_weights_state_health_and_rollback() -> None:
    candidate = {
        "version": "v2",
        "weight_percent": 0.0,
        "shadow_percent": 0.0,
        "configured_weight_percent": 10.0,
        "state": "ready",
        "health": {"requests": 40, "error_rate": 0.5, "p99_s": 1.25},
        "rollback": {
            "reason": "error_rate: 50.0% of 40 requests in 60s failed (max 5.0%)",
            "at": NOW - 42,
        },
    }
    tier = {"tier": "small", "state": "ready", "since": NOW - 60, "replicas": [],
            "versions": {"stable": {"version": "v1"}, "candidate": candidate}}  # fmt: skip
    assert format_status({"tiers": [tier]}, NOW).splitlines() == [
        "small  ready          for  60s  no replicas",
        "    versions: v1 (stable) 100 %, v2 (candidate) 0 %, shadow 0 %; candidate ready, 40 "
        "requests in its window, error rate 50.0%, p99 1.25s",
        "    rolled back 42s ago: error_rate: 50.0% of 40 requests in 60s failed (max 5.0%)",
    ]
    canary = {**candidate, "weight_percent": 10.0, "shadow_percent": 100.0, "rollback": None,
              "health": {"requests": 0}, "state": "loading"}  # fmt: skip
    tier["versions"] = {"stable": {"version": None}, "candidate": canary}
    assert format_status({"tiers": [tier]}, NOW).splitlines()[1] == (
        "    versions: stable (stable) 90 %, v2 (candidate) 10 %, shadow 100 %; candidate loading"
    )


class Router(BaseHTTPRequestHandler):
    seen: list[str | None] = []
    document: dict[str, Any] = DOCUMENT

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("authorization"))
        ok = self.path == "/v1/status"
        body = json.dumps(type(self).document if ok else {"error": {"message": "no"}}).encode()
        self.send_response(200 if ok else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def router_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Router)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Router.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_command_asks_the_router_and_says_whether_all_serve(
    router_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_APP_API_KEY", "sk-from-env")
    assert main(["--url", router_url]) == 1  # a tier failed
    assert "large  failed" in capsys.readouterr().out
    assert main(["--url", router_url, "--api-key", "sk-given", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == DOCUMENT
    assert Router.seen == ["Bearer sk-from-env", "Bearer sk-given"]
    Router.document = {"tiers": [DOCUMENT["tiers"][0]]}
    try:
        assert main(["--url", router_url]) == 0
    finally:
        Router.document = DOCUMENT
    assert main(["--url", "http://127.0.0.1:9"]) == 2
    assert "cannot read the status" in capsys.readouterr().err
