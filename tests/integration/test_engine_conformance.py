"""The local engine against TGI's own OpenAPI spec, bad input, overload and shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from typing import Any

import httpx
import pytest

from tests.openapi import response_validator, spec

from .conftest import RunningEngine, start_engine

SHORT = {"max_new_tokens": 4}
CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
# Greedy and long enough to end on the end-of-sequence token, which has no log-probability.
TO_THE_END = {**CHAT, "max_tokens": 64, "temperature": 0, "logprobs": True, "top_logprobs": 2}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        },
    },
}
TOOLS = {
    **CHAT,
    "messages": [{"role": "user", "content": "Weather in Paris?"}],
    "tools": [WEATHER],
    "tool_choice": "required",
    "max_tokens": 40,
}
# (path, method, body, content type of the answer)
CALLS: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("/generate", "post", {"inputs": "Hi", "parameters": {**SHORT, "details": True,
     "decoder_input_details": True, "top_n_tokens": 2, "seed": 7}}, "application/json"),
    ("/generate_stream", "post", {"inputs": "Hi", "parameters": {**SHORT, "top_n_tokens": 2}},
     "text/event-stream"),
    ("/", "post", {"inputs": "Hi", "parameters": SHORT}, "application/json"),
    ("/", "post", {"inputs": "Hi", "parameters": SHORT, "stream": True}, "text/event-stream"),
    ("/invocations", "post", {"inputs": "Hi", "parameters": SHORT}, "application/json"),
    ("/invocations", "post", CHAT, "application/json"),
    ("/v1/chat/completions", "post", {**CHAT, "logprobs": True, "top_logprobs": 2},
     "application/json"),
    ("/v1/chat/completions", "post", TO_THE_END, "application/json"),
    ("/v1/chat/completions", "post", {**TO_THE_END, "stream": True}, "text/event-stream"),
    ("/v1/chat/completions", "post", {**CHAT, "stream": True,
     "stream_options": {"include_usage": True}}, "text/event-stream"),
    ("/v1/chat/completions", "post", TOOLS, "application/json"),
    ("/v1/chat/completions", "post", {**TOOLS, "stream": True}, "text/event-stream"),
    ("/v1/completions", "post", {"model": "tgi", "prompt": "Hi", "max_tokens": 4},
     "application/json"),
    ("/v1/completions", "post", {"model": "tgi", "prompt": "Hi", "max_tokens": 4, "stream": True},
     "text/event-stream"),
    ("/tokenize", "post", {"inputs": "Hello world"}, "application/json"),
    ("/chat_tokenize", "post", CHAT, "application/json"),
    ("/v1/models", "get", None, "application/json"),
    ("/info", "get", None, "application/json"),
    ("/metrics", "get", None, "text/plain"),
    ("/health", "get", None, ""),
]  # fmt: skip


def events(body: str) -> list[Any]:
    data = [line[5:].strip() for line in body.split("\n") if line.startswith("data:")]
    return [json.loads(d) for d in data if d != "[DONE]"]


@pytest.mark.parametrize(("path", "method", "body", "content_type"), CALLS,
                         ids=[f"{c[1]} {c[0]} {c[3]}" for c in CALLS])  # fmt: skip
def test_answers_match_the_spec(
    engine: RunningEngine, path: str, method: str, body: dict[str, Any] | None, content_type: str
) -> None:
    reply = httpx.request(method, f"{engine.url}{path}", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    if not content_type:
        return
    assert reply.headers["content-type"].startswith(content_type)
    validator = response_validator(path, method, content_type)
    if content_type == "text/event-stream":
        answers = events(reply.text)
        assert answers
    elif content_type == "text/plain":
        answers = [reply.text]
    else:
        answers = [reply.json()]
    for answer in answers:
        validator.validate(answer)


def test_every_route_of_the_spec_is_served_and_checked() -> None:
    spec_routes = {(p, m) for p, ops in spec()["paths"].items() for m in ops}
    assert spec_routes == {(c[0], c[1]) for c in CALLS}


GEN = "/generate"
BAD: list[tuple[str, dict[str, Any] | str | None, int, str]] = [
    # (path, body, TGI's status, text the error must contain)
    (GEN, {"inputs": "Hi", "parameters": {"temperature": 0}}, 422, "`temperature` must be strictly positive"),
    (GEN, {"inputs": "Hi", "parameters": {"temperature": -1}}, 422, "`temperature`"),
    (GEN, {"inputs": "Hi", "parameters": {"top_p": 1.0}}, 422, "`top_p` must be > 0.0 and < 1.0"),
    (GEN, {"inputs": "Hi", "parameters": {"top_p": 0}}, 422, "`top_p`"),
    (GEN, {"inputs": "Hi", "parameters": {"typical_p": 1.5}}, 422, "`typical_p`"),
    (GEN, {"inputs": "Hi", "parameters": {"top_k": 0}}, 422, "`top_k` must be strictly positive"),
    (GEN, {"inputs": "Hi", "parameters": {"repetition_penalty": 0}}, 422, "`repetition_penalty`"),
    (GEN, {"inputs": "Hi", "parameters": {"frequency_penalty": 3}}, 422, "`frequency_penalty`"),
    (GEN, {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, 422, "`max_new_tokens` must be strictly positive"),
    (GEN, {"inputs": "Hi", "parameters": {"max_new_tokens": 5000}}, 422, "`max_new_tokens` must be <= 1024"),
    (GEN, {"inputs": "word " * 600, "parameters": SHORT}, 422, "`inputs` must have less than 512 tokens"),
    (GEN, {"inputs": "word " * 1100, "parameters": SHORT}, 422, "`inputs` tokens + `max_new_tokens` must be <= 1024"),
    (GEN, {"inputs": "Hi", "parameters": {"truncate": 0}}, 422, "`truncate` must be strictly positive and less than 512"),
    (GEN, {"inputs": "Hi", "parameters": {"truncate": 513}}, 422, "Given: 513"),
    (GEN, {"inputs": "Hi", "parameters": {"best_of": 2}}, 422, "you must use sampling when `best_of` is > 1"),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"decoder_input_details": True}}, 422, "not supported when streaming"),
    (GEN, {"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 422, "up to 4 stop sequences"),
    (GEN, {"inputs": "Hi", "parameters": {"top_n_tokens": 9}}, 422, "`top_n_tokens`"),
    (GEN, {"inputs": "Hi", "parameters": {"best_of": 5, "do_sample": True}}, 422, "`best_of` must be > 0 and <= 2"),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": True}}, 422, "`best_of` != 1 is not supported when streaming"),
    (GEN, {"inputs": "", "parameters": SHORT}, 422, "`inputs` cannot be empty"),
    (GEN, {"parameters": SHORT}, 422, "missing field `inputs`"),
    (GEN, {"inputs": 42}, 422, "invalid type"),
    (GEN, {"inputs": "Hi", "parameters": "fast"}, 422, "invalid type"),
    (GEN, {"inputs": "Hi", "parameters": {"max_new_tokens": "many"}}, 422, "`max_new_tokens` must be an integer"),
    (GEN, {"inputs": "Hi", "parameters": {"max_new_tokens": 1.5}}, 422, "`max_new_tokens` must be an integer"),
    (GEN, {"inputs": "Hi", "parameters": {"stop": "a"}}, 200, ""),  # a lone string is accepted
    (GEN, "{not json", 400, "Failed to parse the request body as JSON"),
    (GEN, "[1, 2]", 422, "invalid type"),
    (GEN, None, 415, "Content-Type: application/json"),
    (GEN, {"inputs": "x" * 3_000_000}, 413, "length limit exceeded"),
    ("/v1/chat/completions", {"model": "tgi", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "tgi"}, 422, "missing field `messages`"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 422, "`max_new_tokens` must be strictly positive"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 422, "`response_format`"),
    ("/v1/chat/completions", {**TOOLS, "response_format": {"type": "json_object"}}, 422, "Tool error: Grammar and tools are mutually exclusive"),
    ("/v1/chat/completions", {**TOOLS, "tool_choice": "get_time"}, 422, "Tool error: Tool with name get_time not found"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 422, "`temperature` must be strictly positive"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.0}, 422, "`top_p` must be > 0.0 and < 1.0"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": -2}, 422, "`repetition_penalty` must be strictly positive"),
    ("/v1/completions", {"model": "tgi", "prompt": 7}, 422, "`prompt`"),
    ("/tokenize", {"inputs": ""}, 422, "`inputs` cannot be empty"),
    ("/no/such/route", {}, 404, ""),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD,
                         ids=[f"{i}-{b[0]}-{b[2]}" for i, b in enumerate(BAD)])  # fmt: skip
def test_bad_requests_get_tgis_answer(
    engine: RunningEngine, path: str, body: Any, status: int, message: str
) -> None:
    if body is None:
        reply = httpx.post(f"{engine.url}{path}", content=b"inputs=Hi")
    elif isinstance(body, str):
        reply = httpx.post(f"{engine.url}{path}", content=body.encode(),
                           headers={"content-type": "application/json"})  # fmt: skip
    else:
        reply = httpx.post(f"{engine.url}{path}", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    assert message in reply.text
    if reply.headers.get("content-type", "").startswith("application/json") and status >= 400:
        assert set(reply.json()) == {"error", "error_type"}
    assert httpx.get(f"{engine.url}/health").status_code == 200  # still serving


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_overload_refuses_past_max_concurrent_at_once_and_queues_the_rest(
    tmp_path: Any,
) -> None:
    small = start_engine(tmp_path / "engine.log", "--max-concurrent-requests", "4",
                         "--max-batch-size", "2")  # fmt: skip
    try:
        queue_seen: list[float] = []

        async def one(client: httpx.AsyncClient) -> int:
            body = {"inputs": "1, 2, 3, 4,", "parameters": {"max_new_tokens": 48}}
            reply = await client.post("/generate", json=body)
            return reply.status_code

        async def watch(client: httpx.AsyncClient) -> None:
            for _ in range(40):
                queue_seen.append(metric(small.url, "tgi_queue_size"))
                await asyncio.sleep(0.05)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=small.url, timeout=120) as client:
                watcher = asyncio.create_task(watch(client))
                statuses = await asyncio.gather(*(one(client) for _ in range(16)))
                await watcher
                return statuses

        statuses = asyncio.run(burst())
        assert sorted(statuses) == [200] * 4 + [429] * 12
        assert max(queue_seen) > 0
        assert metric(small.url, "tgi_queue_size") == 0
    finally:
        small.process.terminate()
        small.process.wait(timeout=60)


def test_client_disconnect_frees_the_slot(engine: RunningEngine) -> None:
    before = metric(engine.url, "tgi_request_success")
    body = {"inputs": "1, 2, 3, 4,", "parameters": {"max_new_tokens": 1000}}
    with httpx.stream("POST", f"{engine.url}/generate_stream", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        while not next(lines).startswith("data:"):
            pass
    deadline_checks = 20
    while metric(engine.url, "tgi_batch_current_size") and deadline_checks:
        deadline_checks -= 1
        asyncio.run(asyncio.sleep(0.1))
    assert metric(engine.url, "tgi_batch_current_size") == 0
    assert metric(engine.url, "tgi_request_success") == before  # cancelled, not finished


def test_sigterm_lets_the_stream_in_flight_finish(tmp_path: Any) -> None:
    own = start_engine(tmp_path / "engine.log", "--graceful-termination-timeout", "30")
    body = {"inputs": "1, 2, 3, 4,", "parameters": {"max_new_tokens": 40}}
    with httpx.stream("POST", f"{own.url}/generate_stream", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        own.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    last = json.loads(rest[-1][5:])
    assert json.loads(first[5:])["index"] == 1
    assert last["details"]["generated_tokens"] == last["index"]
    assert own.process.wait(timeout=60) == 0


TIMED = ["x-compute-type", "x-compute-characters", "x-total-time", "x-validation-time",
         "x-queue-time", "x-inference-time", "x-time-per-token", "x-prompt-tokens",
         "x-generated-tokens"]  # fmt: skip
STREAMED = ["x-compute-type", "x-compute-characters", "x-accel-buffering"]
# (path, body, the headers TGI sends with it)
HEADERS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("/generate", {"inputs": "Hi", "parameters": SHORT}, [*TIMED, "x-compute-time"]),
    ("/", {"inputs": "Hi", "parameters": SHORT}, [*TIMED, "x-compute-time"]),
    ("/generate_stream", {"inputs": "Hi", "parameters": SHORT}, STREAMED),
    ("/v1/chat/completions", CHAT, [*TIMED, "x-compute-time"]),
    ("/v1/chat/completions", {**CHAT, "stream": True}, STREAMED),
    ("/v1/completions", {"model": "tgi", "prompt": "Hi", "max_tokens": 4}, TIMED),
    ("/v1/completions", {"model": "tgi", "prompt": "Hi", "max_tokens": 4, "stream": True},
     STREAMED),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "names"), HEADERS,
                         ids=[f"{h[0]}-{i}" for i, h in enumerate(HEADERS)])  # fmt: skip
def test_tgis_response_headers(
    engine: RunningEngine, path: str, body: dict[str, Any], names: list[str]
) -> None:
    reply = httpx.post(f"{engine.url}{path}", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    sent = {k for k in reply.headers if k.startswith("x-")}
    assert sent == set(names)
    values = {k: reply.headers[k] for k in names if k not in ("x-compute-type", "x-compute-time")}
    assert all(v.isdigit() for k, v in values.items() if k != "x-accel-buffering"), values
    if "x-generated-tokens" in names:
        assert int(reply.headers["x-generated-tokens"]) == 4
        assert int(reply.headers["x-total-time"]) >= int(reply.headers["x-inference-time"])
        assert float(reply.headers.get("x-compute-time", "0")) >= 0


# (stop sequences, the text TGI keeps: up to and including the stop, which ends it)
STOPS: list[tuple[list[str], str]] = [
    ([" 7"], " 5, 6, 7"),
    ([",", " 7"], " 5,"),
    (["9"], " 5, 6, 7, 8, 9"),
]


@pytest.mark.parametrize(("stop", "text"), STOPS)
def test_stop_sequences_stay_in_the_text(engine: RunningEngine, stop: list[str], text: str) -> None:
    params = {"max_new_tokens": 30, "stop": stop, "details": True}
    reply = httpx.post(f"{engine.url}/generate", json={"inputs": "1, 2, 3, 4,", "parameters": params},
                       timeout=60)  # fmt: skip
    answer = reply.json()
    assert answer["generated_text"] == text
    assert answer["details"]["finish_reason"] == "stop_sequence"
    body = {"model": "tgi", "prompt": "1, 2, 3, 4,", "max_tokens": 30, "stop": stop,
            "temperature": 0}  # fmt: skip
    completion = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=60).json()
    assert completion["choices"][0]["text"] == text
    assert completion["choices"][0]["finish_reason"] == "stop_sequence"  # TGI's own word


def test_truncate_keeps_the_last_tokens(engine: RunningEngine) -> None:
    body = {"inputs": "1, 2, 3, 4, 5, 6", "parameters": {"truncate": 3, **SHORT}}
    reply = httpx.post(f"{engine.url}/generate", json=body, timeout=60)
    assert reply.status_code == 200 and reply.headers["x-prompt-tokens"] == "3"


def test_abandoned_non_streaming_request_stops_generating(engine: RunningEngine) -> None:
    before = metric(engine.url, "tgi_request_success")
    body = {"inputs": "1, 2, 3, 4,", "parameters": {"max_new_tokens": 900}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{engine.url}/generate", json=body, timeout=1.5)
    checks = 20
    while metric(engine.url, "tgi_batch_current_size") and checks:
        checks -= 1
        asyncio.run(asyncio.sleep(0.1))
    assert metric(engine.url, "tgi_batch_current_size") == 0
    assert metric(engine.url, "tgi_request_success") == before  # cancelled, not finished
