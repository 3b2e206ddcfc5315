"""The router alone, without Ray: every exit of a request settles in-flight, metrics and quota;
admission, spill-over by entitlement, TGI's routes and error vocabulary, bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import ClientDisconnect

from serve_app.config import AppConfig
from serve_app.router.quota import Grant, Refusal
from serve_app.router.sse import Tally

from .router_kit import (
    ListRecorder,
    admitted,
    bearer,
    call,
    chat_answer,
    chat_chunk,
    config,
    router,
    sse_body,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"model": "small", "messages": QUESTION, "max_tokens": 8}


def engine(request: httpx.Request) -> httpx.Response:
    """A TGI engine: answers at once, streams three tokens and usage."""
    body = json.loads(request.content)
    if request.url.path == "/v1/chat/completions" and not body.get("stream"):
        return httpx.Response(200, json=chat_answer())
    if request.url.path == "/v1/chat/completions":
        usage = {**chat_chunk(""), "choices": [], "usage": {"prompt_tokens": 10,
                 "completion_tokens": 3, "total_tokens": 13}}  # fmt: skip
        events = [chat_chunk("Pa"), chat_chunk("r"), chat_chunk("is"), usage]
        return httpx.Response(200, content=sse_body(events))
    if request.url.path == "/generate":
        return httpx.Response(
            200, json={"generated_text": "Paris"},
            headers={"x-prompt-tokens": "7", "x-generated-tokens": "2", "x-compute-time": "0.1",
                     "x-time-per-token": "0.05", "x-request-id": "engine-own"},
        )  # fmt: skip
    if request.url.path == "/generate_stream":
        events = [{"index": i, "token": {"id": i, "text": "a", "logprob": 0, "special": False},
                   "generated_text": None, "details": None} for i in range(4)]  # fmt: skip
        return httpx.Response(200, content=sse_body(events))
    raise AssertionError(request.url.path)


async def slow_engine(request: httpx.Request) -> httpx.Response:
    """An engine that never finishes: whole answers never come, streams never end."""
    body = json.loads(request.content)
    if request.url.path == "/generate_stream":
        token = {"index": 0, "token": {"id": 1, "text": "a", "logprob": 0, "special": False}}
        return httpx.Response(200, content=sse_body([token], forever=True, item=token))
    if body.get("stream"):
        return httpx.Response(200, content=sse_body([chat_chunk("a")], forever=True))
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


def settled(recorder: Any, tiers: tuple[str, ...] = ("small",)) -> bool:
    return all(recorder.gauges.get(t, 0) == 0 for t in tiers)


# -- every exit settles ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "tokens"),
    [
        ("/v1/chat/completions", CHAT, 200, 13),
        ("/v1/chat/completions", {**CHAT, "stream": True}, 200, 13),
        ("/generate", {"inputs": "hi"}, 200, 9),  # the engine's x-prompt/x-generated-tokens
        ("/generate_stream", {"inputs": "hi"}, 200, 4 + 1),  # 4 token events + prompt estimate
    ],
)
def test_a_finished_request_is_counted_and_charged(
    tmp_path: Path, path: str, body: dict[str, Any], status: int, tokens: int
) -> None:
    r, recorder, _ = router(config(tmp_path), engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", path, body, bearer("team-a")))
    assert answer.status == status, answer.body
    assert r.in_flight == {"small": 0} and settled(recorder)
    assert [(t, s, u.total) for t, s, u in recorder.outcomes] == [("small", status, tokens)]
    assert recorder.tokens_by_tenant == {"team-a": tokens}


def test_engine_headers_pass_through_on_tgi_routes(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path), engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", "/generate", {"inputs": "hi"},
                              bearer("team-a")))  # fmt: skip
    for name in ("x-compute-time", "x-time-per-token", "x-prompt-tokens", "x-generated-tokens"):
        assert name in answer.headers
    assert answer.headers.get("x-request-id") != "engine-own"
    assert answer.headers["x-tier"] == "small"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate"])
def test_a_client_gone_while_waiting_settles_and_cancels(tmp_path: Path, path: str) -> None:
    r, recorder, _ = router(config(tmp_path), slow_engine)
    body = CHAT if path.startswith("/v1") else {"inputs": "hi"}

    async def hang_up() -> None:
        task = asyncio.ensure_future(call(r.asgi_app(), "POST", path, body, bearer("team-a")))
        await asyncio.sleep(0.2)
        assert r.in_flight == {"small": 1}
        task.cancel()  # what Serve does when the client hangs up
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(hang_up())
    assert r.in_flight == {"small": 0} and settled(recorder)
    assert [s for _, s, _ in recorder.outcomes] == [499]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate_stream"])
def test_a_stream_cut_by_the_client_settles_and_is_charged(tmp_path: Path, path: str) -> None:
    r, recorder, _ = router(config(tmp_path), slow_engine)
    body = {**CHAT, "stream": True} if path.startswith("/v1") else {"inputs": "hi"}
    answer = asyncio.run(call(r.asgi_app(), "POST", path, body, bearer("team-a"),
                              hang_up_after_chunks=5))  # fmt: skip
    assert answer.status == 200
    assert r.in_flight == {"small": 0}
    ((_, status, usage),) = recorder.outcomes
    assert status == 499 and usage.completion_tokens >= 4  # counted from the stream
    assert recorder.tokens_by_tenant["team-a"] >= 4


def test_a_stream_whose_send_fails_settles(tmp_path: Path) -> None:
    r, recorder, _ = router(config(tmp_path), slow_engine)

    async def cut() -> None:
        with pytest.raises(ClientDisconnect):
            await call(r.asgi_app(), "POST", "/v1/chat/completions", {**CHAT, "stream": True},
                       bearer("team-a"), send_fails_after_chunks=3)  # fmt: skip

    asyncio.run(cut())
    assert r.in_flight == {"small": 0}
    assert [s for _, s, _ in recorder.outcomes] == [499]


def test_a_stream_cancelled_before_its_first_byte_settles(tmp_path: Path) -> None:
    r, recorder, _ = router(config(tmp_path), slow_engine)

    async def cancel_early() -> None:
        task = asyncio.ensure_future(
            call(
                r.asgi_app(),
                "POST",
                "/v1/chat/completions",
                {**CHAT, "stream": True},
                bearer("team-a"),
            )
        )
        await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_early())
    assert r.in_flight == {"small": 0}
    assert len(recorder.outcomes) == 1


def test_engine_errors_keep_one_status_per_protocol(tmp_path: Path) -> None:
    def refusing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            422, json={"error": "temperature must be > 0", "error_type": "validation"}
        )

    r, recorder, _ = router(config(tmp_path), refusing)
    app = r.asgi_app()
    generate = asyncio.run(call(app, "POST", "/generate", {"inputs": "hi"}, bearer("team-a")))
    stream = asyncio.run(call(app, "POST", "/generate_stream", {"inputs": "hi"}, bearer("team-a")))
    chat = asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT, bearer("team-a")))
    assert (generate.status, stream.status, chat.status) == (422, 422, 400)
    assert generate.json()["error_type"] == stream.json()["error_type"] == "validation"
    assert chat.json()["error"]["type"] == "invalid_request_error"
    assert r.in_flight == {"small": 0}
    assert [s for _, s, _ in recorder.outcomes] == [422, 422, 400]


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


def test_request_quota_is_typed_with_openai_headers(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path), engine)
    app = r.asgi_app()
    answers = [asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT, bearer("metered")))
               for _ in range(4)]  # fmt: skip
    assert [a.status for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "2"
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_tokens_are_reserved_up_front_and_reconciled(tmp_path: Path) -> None:
    r, recorder, ledger = router(config(tmp_path), slow_engine)
    app = r.asgi_app()
    body = {"model": "small", "messages": [{"role": "user", "content": "x" * 30}],
            "max_tokens": 64, "stream": True}  # fmt: skip

    async def concurrent() -> int:
        # each reserves 30 + 64 = 94 of 300 tokens: three fit, the fourth is refused at once
        tasks = [asyncio.ensure_future(call(app, "POST", "/v1/chat/completions", body,
                                            bearer("tokens")))
                 for _ in range(3)]  # fmt: skip
        await asyncio.sleep(0.1)
        fourth = await call(app, "POST", "/v1/chat/completions", body, bearer("tokens"))
        assert fourth.json()["error"]["code"] == "tokens_exceeded"
        assert fourth.headers["x-ratelimit-limit-tokens"] == "300"
        for task in tasks:  # the three clients hang up
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # settlement runs in the background
        return fourth.status

    assert asyncio.run(concurrent()) == 429
    assert set(r.in_flight.values()) == {0}  # on `small`, or spilled over to `large`
    # the three cut streams were charged what they produced; the rest of each came back
    used = sum(u.total for _, _, u in recorder.outcomes)
    assert 0 < used < 3 * 94
    assert isinstance(ledger.reserve("tokens", None, 300, 300 - used), Grant)


class _DeadLedger:
    async def reserve(self, *args: Any) -> Grant | Refusal:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def settle(self, *args: Any) -> None:
        raise ConnectionError


@pytest.mark.parametrize(("policy", "status"), [("deny", 503), ("allow", 200)])
def test_a_ledger_that_does_not_answer_gives_the_configured_answer(
    tmp_path: Path, policy: str, status: int
) -> None:
    keys = {"file": str(tmp_path / "keys.yaml"), "on_ledger_failure": policy,
            "tuning": {"ledger_timeout_s": 0.2}}  # fmt: skip
    r, _, _ = router(config(tmp_path, api_keys=keys), engine, _DeadLedger())
    app = r.asgi_app()
    metered = asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT, bearer("metered")))
    assert metered.status == status
    if status == 503:
        assert metered.json()["error"]["code"] == "quota_unavailable"
        assert metered.headers["retry-after"]
    unmetered = asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT, bearer("team-a")))
    assert unmetered.status == 200
    assert r.in_flight.get("small", 0) == 0


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


class _Calls:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_a_streamed_answer_that_cannot_be_built_settles_and_cancels() -> None:
    recorder = ListRecorder()
    life = admitted(recorder)
    life.answer_headers["x-tier-reason"] = "模型"  # a header value HTTP cannot carry
    calls = _Calls()

    async def events() -> AsyncIterator[bytes]:
        yield b""

    with pytest.raises(UnicodeEncodeError):
        life._streamed(events(), Tally(), calls)  # type: ignore[arg-type]
    assert calls.cancelled  # the engine's stream stops
    assert recorder.gauges == {"small": 0}
    assert [(t, s) for t, s, _ in recorder.outcomes] == [("small", 500)]
    life.settle()  # settled once: a second settlement changes nothing
    assert len(recorder.outcomes) == 1


def test_every_exit_gives_the_turn_back() -> None:
    """Answered, streamed to the end, failed after admission: the tier's admission turn comes
    back each time, and the answer says how long it waited for it."""
    cfg = AppConfig.model_validate(
        {"tiers": [{"name": "small", "admission": {"max_in_flight": 1},
                    "default_max_tokens": 8, "max_tokens_limit": 64}]}
    )  # fmt: skip
    r, recorder, _ = router(cfg, engine)
    queue = r.services.admissions["small"]
    app = r.asgi_app()
    cases = [
        ("/v1/chat/completions", CHAT, 200),
        ("/v1/chat/completions", {**CHAT, "stream": True}, 200),
        ("/v1/completions", {"model": "small", "prompt": "hi"}, 502),  # the engine fails: 500
    ]

    async def run() -> None:
        for path, body, status in cases:
            answer = await call(app, "POST", path, body)
            assert answer.status == status, path
            assert queue.in_flight == 0, path
            assert answer.headers["x-admission-wait-ms"] == "0", path  # a turn was free

    asyncio.run(run())
    assert [s for _, s, _ in recorder.outcomes] == [200, 200, 502]


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
    ("/v1/chat/completions", json.dumps({"model": "small", "messages": QUESTION * 2000}).encode(), {}, 400),
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
