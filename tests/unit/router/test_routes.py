"""The router's routes alone, without Ray: spill-over by entitlement, the models a key sees,
TGI's model naming and error vocabulary, bad input a 4xx (every exit's settlement:
test_lifecycle.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.router.accounting import Usage

from .router_kit import (
    CHAT,
    QUESTION,
    bearer,
    call,
    config,
    engine,
    router,
    settled,
    sse_body,
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
    assert asyncio.run(call(app, "GET", "/health", None, {})).json() == {"status": "ok"}
    r.missing_guards = ["RAY_SERVE_HAPROXY_BINARY_PATH"]  # a Ray cluster started by hand
    assert asyncio.run(call(app, "GET", "/health", None, {})).json() == {
        "status": "ok", "ingress_guards_missing": ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    }  # fmt: skip


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


# -- TGI's routes over a vLLM tier ----------------------------------------------------------
# The engine answers as vLLM 0.32 does (chunks recorded from it serving SmolLM2 on CPU); the
# translation's own cases: tests/unit/engine/test_tgi_over_openai.py.


def vllm_config(tmp: Path) -> Any:
    cfg = config(tmp)
    vllm = cfg.tiers[1].model_copy(update={"name": "vllm", "engine": cfg.tiers[1].engine.model_copy(
        update={"launcher": "vllm", "model_id": "served-name"})})  # fmt: skip
    return cfg.model_copy(update={"tiers": (cfg.tiers[0], vllm)})


VLLM_SEEN: list[dict[str, Any]] = []


def _vllm_choice(text: str, token: str, token_id: int, reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "finish_reason": reason, "stop_reason": None,
            "logprobs": {"text_offset": [0], "token_logprobs": [-0.5], "tokens": [token],
                         "top_logprobs": [{token: -0.5}]},
            "token_ids": [token_id], "prompt_token_ids": [1, 2, 3]}  # fmt: skip


def vllm_engine(request: httpx.Request) -> httpx.Response:
    """vLLM's completions: a whole answer, a stream of three tokens, or its 400."""
    assert request.url.path == "/v1/completions", request.url.path
    body = json.loads(request.content)
    VLLM_SEEN.append(body)
    if body.get("echo") and body["max_tokens"] == 0:  # the prompt's tokens: /tokenize
        echoed = _vllm_choice(body["prompt"], "", 0, "length")
        echoed.update(token_ids=[], prompt_token_ids=[9, 10])
        echoed["logprobs"] = {"text_offset": [0, 2], "token_logprobs": [None, -1.0],
                              "tokens": ["hi", " there"], "top_logprobs": [None, {}]}  # fmt: skip
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 1,
                                         "model": body["model"], "choices": [echoed],
                                         "usage": {"prompt_tokens": 2, "completion_tokens": 0,
                                                   "total_tokens": 2}})  # fmt: skip
    if body["max_tokens"] > 32:  # stands for vLLM's own limit
        error = {"message": "max_tokens is too large", "type": "BadRequestError", "code": 400}
        return httpx.Response(400, json={"error": error})
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    pieces = [(" Par", " Par", 7), ("is", "is", 8), ("", "<|im_end|>", 2)]
    if not body["stream"]:
        choice = _vllm_choice(" Paris", "", 0, "stop")
        choice["token_ids"] = [p[2] for p in pieces]
        choice["logprobs"] = {"text_offset": [0, 4, 6], "token_logprobs": [-0.5] * 3,
                              "tokens": [p[1] for p in pieces], "top_logprobs": []}  # fmt: skip
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 1,
                                         "model": body["model"], "choices": [choice],
                                         "usage": usage})  # fmt: skip
    chunks: list[Any] = [
        {"id": "c", "object": "text_completion", "created": 1, "model": body["model"],
         "choices": [_vllm_choice(text, token, i, "stop" if i == 2 else None)]}
        for text, token, i in pieces
    ]  # fmt: skip
    chunks.append({"id": "c", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [], "usage": usage})  # fmt: skip

    async def events() -> Any:
        async for piece in sse_body(chunks):
            yield piece
        yield b"data: [DONE]\n\n"

    return httpx.Response(200, content=events())


def test_generate_on_a_vllm_tier_answers_in_tgis_shape_and_counts_its_tokens(
    tmp_path: Path,
) -> None:
    r, recorder, _ = router(vllm_config(tmp_path), vllm_engine)
    body = {"inputs": "The capital of France is", "parameters": {"details": True}}
    answer = asyncio.run(call(r.asgi_app(), "POST", "/generate", body,
                              {**bearer("team-a"), "x-tier": "vllm"}))  # fmt: skip
    assert answer.status == 200, answer.body
    assert answer.json()["generated_text"] == " Paris"
    details = answer.json()["details"]
    assert details["finish_reason"] == "eos_token" and details["generated_tokens"] == 3
    assert [t["id"] for t in details["tokens"]] == [7, 8, 2]
    assert answer.headers["x-generated-tokens"] == "3" and answer.headers["x-tier"] == "vllm"
    assert VLLM_SEEN[-1]["model"] == "served-name" and VLLM_SEEN[-1]["max_tokens"] == 8
    assert recorder.outcomes == [("vllm", 200, Usage(3, 3))]


def test_generate_stream_on_a_vllm_tier_sends_tgis_token_events(tmp_path: Path) -> None:
    r, recorder, _ = router(vllm_config(tmp_path), vllm_engine)
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 16}}
    answer = asyncio.run(call(r.asgi_app(), "POST", "/generate_stream", body,
                              {**bearer("team-a"), "x-tier": "vllm"}))  # fmt: skip
    assert answer.status == 200
    events = [json.loads(line[5:]) for line in answer.body.decode().split("\n") if line]
    assert [e["token"]["text"] for e in events] == [" Par", "is", "<|im_end|>"]
    assert events[-1]["generated_text"] == " Paris"
    assert events[-1]["details"]["finish_reason"] == "eos_token"
    assert "[DONE]" not in answer.body.decode()  # TGI's stream has none
    assert [(t, s, u.completion_tokens) for t, s, u in recorder.outcomes] == [("vllm", 200, 3)]


@pytest.mark.parametrize(
    ("route", "parameters", "param"),
    [
        ("/generate", {"typical_p": 0.5}, "typical_p"),
        ("/generate_stream", {"watermark": True}, "watermark"),
        ("/", {"top_n_tokens": 2}, "top_n_tokens"),
    ],
)
def test_what_a_vllm_tier_cannot_do_is_a_422_before_admission(
    tmp_path: Path, route: str, parameters: dict[str, Any], param: str
) -> None:
    r, recorder, _ = router(vllm_config(tmp_path), vllm_engine)
    seen = len(VLLM_SEEN)
    body = {"inputs": "hi", "parameters": parameters}
    answers = [asyncio.run(call(r.asgi_app(), "POST", route, body,
                                {**bearer("metered"), "x-tier": "vllm"}))
               for _ in range(4)]  # fmt: skip
    for answer in answers:  # the key's 3 requests a minute are never spent on a refusal
        assert answer.status == 422
        assert answer.json()["error_type"] == "validation"
        assert param in answer.json()["error"]
    assert len(VLLM_SEEN) == seen and recorder.outcomes == []


def test_a_vllm_refusal_is_tgis_422_whole_or_streamed(tmp_path: Path) -> None:
    r, recorder, _ = router(vllm_config(tmp_path), vllm_engine)
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 64}}  # over vLLM's limit here
    for route in ("/generate", "/generate_stream"):
        answer = asyncio.run(call(r.asgi_app(), "POST", route, body,
                                  {**bearer("team-a"), "x-tier": "vllm"}))  # fmt: skip
        assert answer.status == 422, (route, answer.body)
        assert answer.json() == {"error": "max_tokens is too large", "error_type": "validation"}
    assert [s for _, s, _ in recorder.outcomes] == [422, 422]
    assert settled(recorder, ("vllm",))


def test_tokenize_on_either_kind_of_tier_without_a_quota_charge(tmp_path: Path) -> None:
    def engines(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tokenize":  # TGI's own route, passed through
            body = json.loads(request.content)
            return httpx.Response(200, json=[{"id": 1, "text": body["inputs"], "start": 0,
                                              "stop": len(body["inputs"])}])  # fmt: skip
        return vllm_engine(request)

    r, recorder, _ = router(vllm_config(tmp_path), engines)
    app = r.asgi_app()
    body = {"inputs": "hi there"}
    on_vllm = [asyncio.run(call(app, "POST", "/tokenize", body,
                                {**bearer("metered"), "x-tier": "vllm"}))
               for _ in range(4)]  # fmt: skip
    assert [a.status for a in on_vllm] == [200] * 4  # past the key's 3 requests a minute
    assert on_vllm[0].json() == [
        {"id": 9, "text": "hi", "start": 0, "stop": 2},
        {"id": 10, "text": " there", "start": 2, "stop": 8},
    ]
    assert on_vllm[0].headers["x-tier"] == "vllm"
    on_tgi = asyncio.run(call(app, "POST", "/tokenize", body, bearer("team-a")))
    assert on_tgi.json() == [{"id": 1, "text": "hi there", "start": 0, "stop": 8}]
    refused = asyncio.run(call(app, "POST", "/tokenize", {"inputs": ""}, bearer("team-a")))
    assert refused.status == 422 and refused.json()["error_type"] == "validation"
    forbidden = asyncio.run(call(app, "POST", "/tokenize", body,
                                 {**bearer("small-only"), "x-tier": "vllm"}))  # fmt: skip
    assert forbidden.status == 403
    assert recorder.outcomes == []  # nothing generated, nothing admitted


# -- live reconfiguration -------------------------------------------------------------------


def test_a_reconfigured_router_applies_the_new_settings_and_keeps_its_state(
    tmp_path: Path,
) -> None:
    """`Router.reconfigure` (a router of its own application, `serve deploy` of a changed
    config): the next request sees the new settings; the counts, keys and admission queues
    that the change left alone are the same objects."""
    cfg = config(tmp_path, keys=False)
    args = cfg.model_dump(mode="json", exclude_unset=True)
    args["tiers"][1]["admission"] = {"max_in_flight": 4}
    r, recorder, _ = router(type(cfg).model_validate(args), engine)
    app = r.asgi_app()
    before = r.services
    large = {**CHAT, "model": "large", "max_tokens": 100}
    assert asyncio.run(call(app, "POST", "/v1/chat/completions", large)).status == 200
    args["tiers"][1]["max_tokens_limit"] = 50
    args["tiers"][0]["aliases"] = ["tiny"]
    r.reconfigure(type(cfg).model_validate(args))
    refused = asyncio.run(call(app, "POST", "/v1/chat/completions", large))
    assert refused.status == 400 and refused.json()["error"]["param"] == "max_tokens"
    tiny = asyncio.run(call(app, "POST", "/v1/chat/completions", {**CHAT, "model": "tiny"}))
    assert tiny.status == 200 and tiny.headers["x-tier"] == "small"
    after = r.services
    assert after.in_flight is before.in_flight and after.recorder is recorder
    assert after.admissions["large"] is before.admissions["large"]
    assert settled(recorder, ("small", "large"))
    args["tiers"][1]["admission"] = {"max_in_flight": 2}
    r.reconfigure(type(cfg).model_validate(args))
    assert r.services.admissions["large"] is not before.admissions["large"]


# -- tiers' states ----------------------------------------------------------------------------


def test_models_and_the_status_route_show_each_tiers_state(tmp_path: Path) -> None:
    from serve_app.router.tier_states import ReplicaView, TierState, TierStatus
    from serve_app.tier.startup import Phase

    r, _, _ = router(config(tmp_path), engine)
    app = r.asgi_app()
    r.states.put(TierStatus("small", TierState.READY, 50.0))
    loading = ReplicaView("r1", "STARTING", Phase.LOADING, 60.0)
    r.states.put(TierStatus("large", TierState.LOADING, 60.0, None, (loading,)))
    models = asyncio.run(call(app, "GET", "/v1/models", None, bearer("team-a"))).json()
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id["gpt-4o-mini"]["status"] == {"state": "ready", "since": 50.0, "reason": None}
    assert by_id["large"]["status"]["state"] == "loading"
    assert "status" not in by_id["auto"]
    assert by_id["large"]["object"] == "model" and by_id["large"]["owned_by"] == "serve-app"
    # OpenAI's client takes the list as it is, and keeps the extra field
    from openai.types import Model

    parsed = Model.model_validate(by_id["large"])
    assert parsed.id == "large" and (parsed.model_extra or {})["status"]["state"] == "loading"
    one = asyncio.run(call(app, "GET", "/v1/models/large", None, bearer("team-a"))).json()
    assert one["status"]["state"] == "loading"

    status = asyncio.run(call(app, "GET", "/v1/status", None, bearer("team-a"))).json()
    assert status["object"] == "status"
    tiers = {t["tier"]: t for t in status["tiers"]}
    assert tiers["large"]["replicas"] == [loading.as_json()]
    assert tiers["small"]["state"] == "ready"
    # a key sees the tiers it may use; without a key, nothing
    mine = asyncio.run(call(app, "GET", "/v1/status", None, bearer("small-only"))).json()
    assert [t["tier"] for t in mine["tiers"]] == ["small"]
    assert asyncio.run(call(app, "GET", "/v1/status", None, {})).status == 401


def test_a_tier_the_router_has_not_seen_yet_is_unknown(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path), engine)
    status = asyncio.run(call(r.asgi_app(), "GET", "/v1/status", None, bearer("team-a"))).json()
    assert {t["state"] for t in status["tiers"]} == {"unknown"}


def test_the_status_route_shows_a_tiers_versions_and_its_candidates_state(tmp_path: Path) -> None:
    from serve_app.config import AppConfig
    from serve_app.router.tier_states import TierState, TierStatus

    args = config(tmp_path).model_dump(mode="json", exclude_unset=True)
    args["tiers"][0]["version"] = "v1"
    args["tiers"][0]["candidate"] = {"version": "v2", "weight_percent": 10}
    r, _, _ = router(AppConfig.model_validate(args), engine)
    r.states.put(TierStatus("small", TierState.READY, 50.0))
    r.states.put(TierStatus("small@v2", TierState.LOADING, 70.0))
    status = asyncio.run(call(r.asgi_app(), "GET", "/v1/status", None, bearer("team-a"))).json()
    tiers = {t["tier"]: t for t in status["tiers"]}
    versions = tiers["small"]["versions"]
    assert versions["stable"]["version"] == "v1"
    candidate = versions["candidate"]
    assert candidate["version"] == "v2" and candidate["weight_percent"] == 10
    assert (candidate["state"], candidate["since"]) == ("loading", 70.0)
    assert tiers["large"]["versions"]["candidate"] is None
