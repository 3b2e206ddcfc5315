"""A request's life (`serve_app.router.lifecycle`) through the router alone, without Ray: every
exit settles in-flight, metrics, quota and the admission turn once; quotas reserved and settled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.requests import ClientDisconnect

from serve_app.config import AppConfig
from serve_app.router.quota import Grant, Refusal
from serve_app.router.sse import Tally

from .router_kit import (
    CHAT,
    KEYS,
    ListRecorder,
    admitted,
    bearer,
    call,
    config,
    engine,
    router,
    settled,
    slow_engine,
)

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
    # the engine had the prompt: it is charged (as the engine counts it for a token quota,
    # estimated otherwise), nothing more
    assert [u.completion_tokens for _, _, u in recorder.outcomes] == [0]
    assert recorder.tokens_by_tenant["team-a"] > 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate_stream"])
def test_a_streams_timing_is_recorded_once_per_request(tmp_path: Path, path: str) -> None:
    """The first token at once; the gaps between writes as one mean, at settlement."""
    r, recorder, _ = router(config(tmp_path), slow_engine)
    body = {**CHAT, "stream": True} if path.startswith("/v1") else {"inputs": "hi"}
    asyncio.run(call(r.asgi_app(), "POST", path, body, bearer("team-a"), hang_up_after_chunks=5))
    assert recorder.first_tokens == 1
    assert len(recorder.gaps) == 1 and recorder.gaps[0] > 0


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


# -- admission: quota -------------------------------------------------------------------------


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
        # each reserves the engine's count of its prompt (a word and the template's 4 tokens)
        # + 64 = 69 of 300 tokens: four fit, the fifth is refused at once
        tasks = [asyncio.ensure_future(call(app, "POST", "/v1/chat/completions", body,
                                            bearer("tokens")))
                 for _ in range(4)]  # fmt: skip
        await asyncio.sleep(0.1)
        fourth = await call(app, "POST", "/v1/chat/completions", body, bearer("tokens"))
        assert fourth.json()["error"]["code"] == "tokens_exceeded"
        assert fourth.headers["x-ratelimit-limit-tokens"] == "300"
        for task in tasks:  # the four clients hang up
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # settlement runs in the background
        return fourth.status

    assert asyncio.run(concurrent()) == 429
    assert set(r.in_flight.values()) == {0}  # on `small`, or spilled over to `large`
    # the four cut streams were charged their prompts and what they produced; the rest of each
    # came back
    used = sum(u.total for _, _, u in recorder.outcomes)
    assert all(u.prompt_tokens == 5 for _, _, u in recorder.outcomes)
    assert 4 * 5 < used < 4 * 69
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


def test_a_key_over_its_rate_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    r, _, _ = router(config(tmp_path), engine)
    app = r.asgi_app()
    statuses = [
        asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT, bearer("metered"))).status
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]  # the key is over its rate from here
    # 1.2 MB that is not JSON: read, it would be a 413; parsed, a 400
    junk = asyncio.run(call(app, "POST", "/v1/chat/completions", None, bearer("metered"),
                            chunks=[b"x" * 100_000] * 12))  # fmt: skip
    assert junk.status == 429, junk.body
    assert junk.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(junk.headers["retry-after"]) <= 60


def test_a_tool_heavy_prompt_reserves_what_the_engine_counts(tmp_path: Path) -> None:
    r, _, ledger = router(config(tmp_path), engine)
    tool = {"type": "function", "function": {"name": "lookup", "description": "a b c d e f",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}  # fmt: skip
    body = {**CHAT, "tools": [tool] * 3, "max_tokens": 10}
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions", body, bearer("tokens")))
    assert answer.status == 200
    # the engine counted the question, its template and the tools' words: held while it ran,
    # then settled to the engine's own usage (10 + 3), so 300 - 13 remain
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) == 300 - (
        4 + 6 + 3 * len(json.dumps(tool).split()) + 10
    )
    assert isinstance(ledger.reserve("tokens", None, 300, 300 - 13), Grant)


def test_a_revoked_keys_stream_ends_with_an_error_event(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    keys_file = tmp_path / "keys.yaml"
    cfg = AppConfig.model_validate(
        {**cfg.model_dump(), "router": {**cfg.router.model_dump(),
         "api_keys": {"file": str(keys_file), "tuning": {"reload_interval_s": 0.05}}}}
    )  # fmt: skip
    r, recorder, _ = router(cfg, slow_engine)
    body = {**CHAT, "stream": True}

    async def revoke() -> Any:
        task = asyncio.ensure_future(call(r.asgi_app(), "POST", "/v1/chat/completions", body,
                                          bearer("team-a")))  # fmt: skip
        await asyncio.sleep(0.3)
        kept = [{"name": n, **spec} for n, spec in KEYS.items() if n != "team-a"]
        keys_file.write_text(yaml.safe_dump(kept))
        return await asyncio.wait_for(task, 5)

    answer = asyncio.run(revoke())
    assert answer.status == 200
    events = [e for e in answer.body.decode().split("\n\n") if e]
    assert json.loads(events[-2].removeprefix("data:"))["error"]["message"] == (
        "the API key was revoked during this stream"
    )
    assert events[-1] == "data: [DONE]"
    assert r.in_flight == {"small": 0}
    assert [s for _, s, _ in recorder.outcomes] == [401]


# -- every request on the dashboards and in the usage log -----------------------------------


def usage_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "serve_app.usage"]


def test_refusals_before_admission_are_counted_under_the_tier_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="serve_app.usage")
    r, recorder, _ = router(config(tmp_path), engine)
    app = r.asgi_app()
    unknown = asyncio.run(call(app, "POST", "/v1/chat/completions", {**CHAT, "model": "nope"},
                               bearer("team-a")))  # fmt: skip
    no_key = asyncio.run(call(app, "POST", "/v1/chat/completions", CHAT))
    not_allowed = asyncio.run(call(app, "POST", "/v1/chat/completions", {**CHAT, "model": "large"},
                                   bearer("small-only")))  # fmt: skip
    too_many = asyncio.run(call(app, "POST", "/generate",
                                {"inputs": "hi", "parameters": {"max_new_tokens": 1000}},
                                bearer("team-a")))  # fmt: skip
    assert [unknown.status, no_key.status, not_allowed.status, too_many.status] == [
        404, 401, 403, 422
    ]  # fmt: skip
    assert recorder.refusals == [("none", 404), ("none", 401), ("large", 403), ("small", 422)]
    assert recorder.outcomes == []  # nothing was admitted
    lines = usage_lines(caplog)
    assert [(u["tier"], u["status"], u["tenant"]) for u in lines] == [
        (None, 404, "team-a"), (None, 401, None), ("large", 403, "small-only"),
        ("small", 422, "team-a"),
    ]  # fmt: skip
    assert all(u["prompt_tokens"] == 0 == u["completion_tokens"] for u in lines)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate"])
def test_a_whole_answer_has_a_first_token_time_and_one_usage_line(
    tmp_path: Path, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="serve_app.usage")
    r, recorder, _ = router(config(tmp_path), engine)
    body = CHAT if path.startswith("/v1") else {"inputs": "hi"}
    headers = {**bearer("team-a"), "x-feature": "search", "x-request-id": "req-1"}
    answer = asyncio.run(call(r.asgi_app(), "POST", path, body, headers))
    assert answer.status == 200
    assert recorder.first_tokens == 1
    (line,) = usage_lines(caplog)
    ((_, _, usage),) = recorder.outcomes
    assert line["tenant"] == "team-a" and line["feature"] == "search"
    assert line["request_id"] == "req-1" and line["route"] == path and line["tier"] == "small"
    assert (
        (line["prompt_tokens"], line["completion_tokens"])
        == (usage.prompt_tokens, usage.completion_tokens)
        == ((10, 3) if path.startswith("/v1") else (7, 2))
    )  # the engine's own counts
    assert len(line["key_id"]) == 12 and KEYS["team-a"]["key"] not in json.dumps(line)
    assert 0 <= line["ttft_s"] <= line["duration_s"]


def test_a_cut_stream_has_its_usage_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="serve_app.usage")
    r, recorder, _ = router(config(tmp_path), slow_engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions",
                              {**CHAT, "stream": True}, bearer("team-a"),
                              hang_up_after_chunks=3))  # fmt: skip
    assert answer.status == 200
    (line,) = usage_lines(caplog)
    ((_, status, usage),) = recorder.outcomes
    assert line["status"] == status == 499
    assert line["completion_tokens"] == usage.completion_tokens >= 2
