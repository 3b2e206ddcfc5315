"""The router's routes alone, without Ray: spill-over by entitlement, the models a key sees,
TGI's model naming and error vocabulary, bad input a 4xx (every exit's settlement:
test_lifecycle.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from .router_kit import (
    CHAT,
    QUESTION,
    bearer,
    call,
    config,
    engine,
    router,
    settled,
)

# -- admission ------------------------------------------------------------------------------


def test_spill_over_only_to_a_tier_the_key_may_use(tmp_path: Path) -> None:
    r, recorder, _ = router(config(tmp_path), engine)
    r.services.in_flight.by_tier["small"] = 5  # small is saturated in this replica
    app = r.asgi_app()
    small_only = asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT, bearer("small-only")))
    everyone = asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT, bearer("team-a")))
    assert small_only.status == 200 and small_only.headers["x-tier"] == "small"
    assert everyone.status == 200 and everyone.headers["x-tier"] == "large"
    assert recorder.spills == [("small", "large")]


def test_models_list_only_what_a_key_may_use(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path), engine)
    app = r.asgi_app()
    mine = asyncio.run(call(app, "GET", "/v1/models", None, bearer("small-only"))).json()
    assert {m["id"] for m in mine["data"]} == {"small", "gpt-4o-mini", "auto"}  # auto: small only
    everyone = asyncio.run(call(app, "GET", "/v1/models", None, bearer("team-a"))).json()
    assert {m["id"] for m in everyone["data"]} == {"small", "gpt-4o-mini", "large", "auto"}
    assert (
        asyncio.run(call(app, "GET", "/v1/models/large", None, bearer("small-only"))).status == 404
    )
    assert asyncio.run(call(app, "GET", "/v1/models", None, {})).status == 401
    assert asyncio.run(call(app, "GET", "/health", None, {})).status == 200


# -- TGI's model naming and error vocabulary ------------------------------------------------


def test_tgi_routes_speak_tgis_error_types(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path), engine)
    app = r.asgi_app()
    too_many = {"inputs": "hi", "parameters": {"max_new_tokens": 1000}}
    answer = asyncio.run(call(app, "POST", "/generate", too_many, bearer("team-a")))
    assert answer.status == 422 and answer.json()["error_type"] == "validation"
    unknown = asyncio.run(call(app, "POST", "/generate", {"inputs": "hi"},
                               {**bearer("team-a"), "x-tier": "whatever"}))  # fmt: skip
    assert unknown.status == 200 and unknown.headers["x-tier"] == "small"


def test_unknown_models_go_to_the_fallback_tier_when_configured(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path, keys=False, fallback_tier="large"), engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions",
                              {**CHAT, "model": "dummy"}))  # fmt: skip
    assert answer.status == 200 and answer.headers["x-tier"] == "large"
    assert answer.json()["model"] == "dummy"
    r, _, _ = router(config(tmp_path, keys=False), engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions",
                              {**CHAT, "model": "dummy"}))  # fmt: skip
    assert answer.status == 404


@pytest.mark.parametrize("model", ["模型", "two\nlines", "x" * 5000])
@pytest.mark.parametrize("stream", [False, True])
def test_any_unknown_model_name_is_answered_on_the_fallback_tier(
    tmp_path: Path, model: str, stream: bool
) -> None:
    """The client's model name is echoed in the body, never in a header."""
    r, recorder, _ = router(config(tmp_path, keys=False, fallback_tier="large"), engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions",
                              {**CHAT, "model": model, "stream": stream}))  # fmt: skip
    assert answer.status == 200, answer.body
    assert answer.headers["x-tier-reason"] == "fallback for an unknown model"
    assert r.in_flight == {"large": 0} and settled(recorder, ("large",))
    assert [(t, s) for t, s, _ in recorder.outcomes] == [("large", 200)]


# -- malformed input: a 4xx, never a 5xx ----------------------------------------------------

DEEP = b"[" * 5000 + b"]" * 5000
MALFORMED = [
    ("/v1/chat/completions", DEEP, {}, 400),
    ("/v1/chat/completions", b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", {}, 400),
    ("/generate", b'{"inputs": ' + DEEP + b"}", {}, 422),
    ("/v1/chat/completions", b'{"model": "small", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400),
    ("/generate", b'{"inputs": "\\udfff"}', {}, 422),
    ("/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": 1000.0}}', {}, 422),
    ("/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": 8.0}}', {}, 422),
    ("/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": true}}', {}, 422),
    ("/generate", b'{"inputs": "hi", "parameters": []}', {}, 422),
    ("/", b'{"inputs": "hi", "parameters": {"max_new_tokens": 10000}, "stream": true}', {}, 422),
    ("/v1/chat/completions", json.dumps({"model": "small", "messages": [{"role": "user", "content": "x"}] * 1001}).encode(), {}, 400),
    # over what the largest tier's input tokens could fill: refused before it is parsed
    ("/v1/chat/completions", json.dumps({"model": "small", "messages": QUESTION * 2000}).encode(), {}, 413),
    ("/v1/chat/completions", b"\xff\xfe{}", {}, 400),
    ("/v1/chat/completions", b'{"x": NaN}', {}, 400),
    ("/v1/chat/completions", b"[]", {}, 400),
    ("/v1/chat/completions", json.dumps(CHAT).encode(), {"x-big": "a" * 40_000}, 431),
    ("/v1/chat/completions", json.dumps(CHAT).encode(), {"x-request-id": "\xff\xfe"}, 200),
    ("/v1/chat/completions", json.dumps(CHAT).encode(), {"authorization": "Bearer \xff\xfe" * 3}, 401),
    ("/v1/chat/completions", b"x" * 3_000_000, {}, 413),
]  # fmt: skip


@pytest.mark.parametrize(("path", "raw", "headers", "status"), MALFORMED)
def test_malformed_input_is_a_4xx(
    tmp_path: Path, path: str, raw: bytes, headers: dict[str, str], status: int
) -> None:
    r, _, _ = router(config(tmp_path), engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", path, None,
                              {**bearer("team-a"), **headers}, raw=raw))  # fmt: skip
    assert answer.status == status, answer.body[:300]
    error = answer.json().get("error") if status >= 400 else None
    if status >= 400 and path.startswith("/v1"):
        assert error["message"]
    elif status >= 400:
        assert answer.json()["error_type"] == "validation"
    assert r.in_flight.get("small", 0) == 0


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path, tuning={"max_body_bytes": 10_000}), engine)
    sent = [b'{"model": "small", "prompt": "'] + [b"a" * 1000] * 50 + [b'"}']
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/completions", None, bearer("team-a"),
                              chunks=sent))  # fmt: skip
    assert answer.status == 413


def test_a_body_that_never_ends_is_a_408(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path, tuning={"body_timeout_s": 0.2}), engine)
    app = r.asgi_app()

    async def trickle() -> int:
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/",
                 "query_string": b"", "headers": [(b"authorization", bearer("team-a")["authorization"].encode())],
                 "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("t", 1),
                 "root_path": ""}  # fmt: skip
        sent: list[dict[str, Any]] = []
        first = True

        async def receive() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"{", "more_body": True}
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), 5)
        return int(sent[0]["status"])

    assert asyncio.run(trickle()) == 408
