"""Tenants billed as the engine counts, and hostile ones refused early, through the real stack
with the real local engine: token reservations from the engine's own tokenizer and chat
template, a cut stream billed what it carried, a key over its rate refused before its body is
read, bodies no tier could take refused unparsed, and a revoked key's stream ended."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from text_generation import Client
from text_generation.errors import OverloadedError

from devstack.hosts import engine_url
from tests.helpers import wait_for

from .conftest import Stack, local_config

BIG = 100_000  # tokens per minute of the keys whose reservations are read back
KEYS: dict[str, dict[str, Any]] = {
    "honest": {"tokens_per_minute": 3000},
    "english": {"tokens_per_minute": BIG},
    "emoji": {"tokens_per_minute": BIG},
    "cjk": {"tokens_per_minute": BIG},
    "tools": {"tokens_per_minute": BIG},
    "cut": {"tokens_per_minute": BIG},
    "rate": {"requests_per_minute": 2},
    "tgi-rate": {"requests_per_minute": 1},
    "revoked": {},
    "daily": {"tokens_per_day": 400},
}
KEYS_FILE: list[Path] = []


def key(name: str) -> str:
    return f"sk-{name}-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(ray_head: Stack, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump([{"name": n, "key": key(n), **s} for n, s in KEYS.items()]))
    KEYS_FILE.append(path)
    config = local_config()
    args = config["applications"][0]["args"]
    small = args["tiers"][0]
    small.pop("overflow_tier")
    small["replicas"] = {"min": 1, "max": 1}
    # a stream that lasts 20 s (50 ms a token) whatever the model would say, for a key to be
    # revoked in the middle of
    slow = ["--sim-itl-ms", "50", "--sim-output-tokens", "400"]
    engine = {"launcher": "local", "model_id": "simulated", "extra_args": slow}
    sim = {"name": "sim", "default_max_tokens": 400, "engine": engine}
    args["tiers"] = [small, sim]  # one real engine is enough here
    args["router"]["auto_rules"] = []
    args["router"]["api_keys"] = {"file": str(path), "tuning": {"reload_interval_s": 1}}
    ray_head.deploy(config)
    return ray_head


def client(stack: Stack, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key(name), max_retries=0)


ENGLISH = "The quick brown fox jumps over the lazy dog near the quiet river bank. " * 70
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_weather",
        "description": "Look up the weather forecast for a city on a given day.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "day": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PROMPTS: dict[str, dict[str, Any]] = {
    "english": {"messages": [{"role": "user", "content": ENGLISH[:1500]}]},
    "emoji": {"messages": [{"role": "user", "content": "😀🎉🚀🌍" * 60}]},
    "cjk": {"messages": [{"role": "user", "content": "人工智能正在改变我们的世界。" * 25}]},
    "tools": {
        "messages": [{"role": "user", "content": "What is the weather in Paris tomorrow?"}],
        "tools": [TOOL] * 6,
    },
}


def reserved_prompt(answer: httpx.Response, max_tokens: int) -> int:
    """What admission reserved for the prompt, read from a fresh key's remaining tokens."""
    return BIG - int(answer.headers["x-ratelimit-remaining-tokens"]) - max_tokens


@pytest.mark.parametrize("name", list(PROMPTS))
def test_a_reservation_is_the_engines_own_count(stack: Stack, name: str) -> None:
    # a tool call needs room for its JSON: cut short, the engine cannot parse it
    max_tokens = 160 if name == "tools" else 4
    body = {"model": "small", "max_tokens": max_tokens, **PROMPTS[name]}
    answer = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=120,
                        headers={"authorization": f"Bearer {key(name)}"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    engine = answer.json()["usage"]["prompt_tokens"]
    reserved = reserved_prompt(answer, max_tokens)
    characters = sum(len(json.dumps(m["content"], ensure_ascii=False)) for m in body["messages"])
    print(f"\n{name}: characters {characters}, reserved {reserved}, engine {engine}")
    assert abs(reserved - engine) <= 0.1 * engine, (reserved, engine)


def test_an_honest_thousand_token_prompt_fits_a_fresh_3000_token_key(stack: Stack) -> None:
    answer = client(stack, "honest").chat.completions.create(
        model="small", messages=[{"role": "user", "content": ENGLISH}], max_tokens=16
    )
    # ~1,000 tokens in ~5,000 characters: charged per character, it could not fit 3,000
    assert answer.usage is not None and 900 <= answer.usage.prompt_tokens <= 1400
    assert len(ENGLISH) + 16 > 3000


def engine_tokens(stack: Stack) -> float:
    """Tokens the module's one real engine generated so far, cut requests included."""
    (argv,) = [a for a in stack.engines().values() if "simulated" not in a]
    text = httpx.get(f"{engine_url(argv)}/metrics", timeout=10).text
    name = "local_engine_tokens_generated "  # TGI's way: a counter under its own name
    found = [x for x in text.splitlines() if x.startswith(name)]
    assert found, (engine_url(argv), text[:3000])
    return float(found[0].split()[1])


def test_a_stream_cut_after_five_tokens_is_billed_what_the_engine_generated(
    stack: Stack,
) -> None:
    body = {"model": "small", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 200, "stream": True}  # fmt: skip
    headers = {"authorization": f"Bearer {key('cut')}"}
    before = engine_tokens(stack)
    received = 0
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as stream:  # fmt: skip
        for line in stream.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                received += 1
                if received == 5:
                    break
    time.sleep(2)  # the router sees the cut, cancels the engine's work and settles
    generated = engine_tokens(stack) - before
    # the same prompt, whole: the ledger's remaining tokens give what the cut stream was billed
    whole = httpx.post(f"{stack.url}/v1/chat/completions", json={**body, "stream": False,
                       "max_tokens": 1}, headers=headers, timeout=60)  # fmt: skip
    assert whole.status_code == 200, whole.text
    prompt = whole.json()["usage"]["prompt_tokens"]
    billed = BIG - int(whole.headers["x-ratelimit-remaining-tokens"]) - (prompt + 1)
    print(f"\ncut stream: prompt {prompt}, completion billed {billed - prompt}, "
          f"engine generated {generated:.0f}, client read 5")  # fmt: skip
    assert generated < 200  # the engine stopped
    assert abs((billed - prompt) - generated) <= 1


def test_a_key_over_its_rate_is_refused_before_its_body_is_read(stack: Stack) -> None:
    sdk = client(stack, "rate")
    for _ in range(2):
        sdk.chat.completions.create(model="small", messages=PROMPTS["cjk"]["messages"],
                                    max_tokens=1)  # fmt: skip
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="small", messages=PROMPTS["cjk"]["messages"],
                                    max_tokens=1)  # fmt: skip
    assert refused.value.code == "rate_limit_exceeded"
    # 1.2 MB that is not JSON: read, it would be a 413, parsed a 400; it is neither
    junk = httpx.post(f"{stack.url}/v1/chat/completions", content=b"x" * 1_200_000, timeout=60,
                      headers={"authorization": f"Bearer {key('rate')}"})  # fmt: skip
    assert junk.status_code == 429, junk.text
    assert junk.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(junk.headers["retry-after"]) <= 60


def test_tgis_client_over_its_rate_gets_tgis_429(stack: Stack) -> None:
    tgi = Client(stack.url, headers={"authorization": f"Bearer {key('tgi-rate')}"}, timeout=60)
    assert tgi.generate("Hello", max_new_tokens=2).generated_text is not None
    with pytest.raises(OverloadedError, match="requests per minute"):  # TGI says 429 so
        tgi.generate("Hello", max_new_tokens=2)


def test_a_body_no_tier_could_take_is_refused_unparsed(stack: Stack) -> None:
    """60,000 empty messages (1.8 MB): over what the tier's 1,536 input tokens could fill."""
    body = json.dumps({"model": "small", "messages": [{"role": "user", "content": ""}] * 60_000})
    started = time.perf_counter()
    answer = httpx.post(f"{stack.url}/v1/chat/completions", content=body.encode(), timeout=60,
                        headers={"authorization": f"Bearer {key('english')}",
                                 "content-type": "application/json"})  # fmt: skip
    took = time.perf_counter() - started
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["message"].startswith("the request body is over the limit of")
    print(f"\n60,000 messages refused in {took * 1000:.0f} ms")


def test_a_revoked_keys_stream_ends_with_an_error(stack: Stack) -> None:
    sdk = client(stack, "revoked")
    stream = sdk.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "Hi"}], max_tokens=400, stream=True
    )
    chunks = 0
    with pytest.raises(openai.APIError, match="revoked"):
        for _ in stream:
            chunks += 1
            if chunks == 3:
                kept = [{"name": n, "key": key(n), **s} for n, s in KEYS.items() if n != "revoked"]
                KEYS_FILE[0].write_text(yaml.safe_dump(kept))
    assert chunks < 200  # ended long before its 400 tokens
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model="small", messages=PROMPTS["cjk"]["messages"],
                                    max_tokens=1)  # fmt: skip


def usage_lines(stack: Stack) -> dict[str, dict[str, Any]]:
    """The usage log's lines in the router replicas' stdout logs, by request id."""
    assert stack.head.temp_dir
    found: dict[str, dict[str, Any]] = {}
    for path in Path(stack.head.temp_dir, "session_latest", "logs").glob("worker-*.out"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith('{"time":'):
                record = json.loads(line)
                found[record["request_id"]] = record
    return found


def test_every_request_has_one_usage_line_with_the_engines_counts(stack: Stack) -> None:
    headers = {"authorization": f"Bearer {key('english')}", "x-feature": "search"}
    answer = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                        json={"model": "small", "messages": PROMPTS["cjk"]["messages"],
                              "max_tokens": 3},
                        headers={**headers, "x-request-id": "usage-answered"})  # fmt: skip
    refused = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                         json={"model": "nope", "messages": PROMPTS["cjk"]["messages"]},
                         headers={**headers, "x-request-id": "usage-refused"})  # fmt: skip
    assert (answer.status_code, refused.status_code) == (200, 404)
    wait_for(lambda: {"usage-answered", "usage-refused"} <= set(usage_lines(stack)), 30,
             "the usage lines")  # fmt: skip
    lines = usage_lines(stack)
    served, no_model = lines["usage-answered"], lines["usage-refused"]
    usage = answer.json()["usage"]
    assert (served["prompt_tokens"], served["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"]
    )  # fmt: skip
    assert served["tenant"] == "english" and served["feature"] == "search"
    assert served["tier"] == "small" and served["status"] == 200 and served["ttft_s"] > 0
    assert (no_model["tier"], no_model["status"], no_model["model"]) == (None, 404, "nope")
    assert key("english") not in json.dumps(lines)


def test_a_spent_daily_budget_is_refused_as_insufficient_quota(stack: Stack) -> None:
    sdk = client(stack, "daily")
    question = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    served = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):
            sdk.chat.completions.create(model="small", messages=question, max_tokens=100)
            served += 1
    assert 1 <= served <= 3
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_quota"
    assert body["type"] == "insufficient_quota"
    assert "daily token budget" in body["message"] and "00:00 UTC" in body["message"]
    retry = int(refused.value.response.headers["retry-after"])
    assert 0 < retry <= 86_400
