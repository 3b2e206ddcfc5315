"""Hostile grammars and stops through the real stack, with the real clients: refused by the
router before any engine sees them, while a neighbour's requests go on as before."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType

from .conftest import Stack, local_config

EXPLODING = "(a|b)*a(a|b){14}"  # its state machine takes TGI's compiler minutes
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    ray_head.deploy(local_config())
    return ray_head


def test_an_exploding_regex_is_refused_with_openais_error(stack: Stack) -> None:
    client = stack.openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="small",
            messages=QUESTION,
            extra_body={"response_format": {"type": "regex", "value": EXPLODING}},
        )
    error = info.value.body
    assert isinstance(error, dict)
    assert error["param"] == "response_format.value"
    assert "did not compile within 0.5s (grammar.check_timeout_s)" in error["message"]


def test_an_exploding_pattern_in_a_tool_schema_is_refused(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": EXPLODING}}}
    tools: Any = [{"type": "function", "function": {"name": "lookup", "parameters": schema}}]
    with pytest.raises(openai.BadRequestError) as info:
        stack.openai().chat.completions.create(model="small", messages=QUESTION, tools=tools)
    assert info.value.body["param"] == "tools[0].function.parameters"  # type: ignore[index]


def test_tgi_clients_get_a_validation_error_for_a_grammar_or_a_long_stop(stack: Stack) -> None:
    client = Client(stack.url, headers={"X-Tier": "small"}, timeout=60)
    with pytest.raises(ValidationError, match="did not compile within"):
        client.generate("Hi", grammar=Grammar(type=GrammarType.Regex, value=EXPLODING))
    with pytest.raises(ValidationError, match="at most 256 are allowed"):
        client.generate("Hi", stop_sequences=["x" * 5000])
    long = [{"role": "user", "content": "Hi"}]
    answer = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                        json={"model": "small", "messages": long, "stop": ["y" * 257]})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stop"
    assert "Paris" in client.generate("The capital of France is", max_new_tokens=3).generated_text


def test_twenty_exploding_grammars_leave_a_neighbours_latency_alone(stack: Stack) -> None:
    client = stack.openai()
    engines = stack.engines()

    def neighbour(n: int) -> list[float]:
        took = []
        for _ in range(n):
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model="small", messages=QUESTION, max_tokens=4, temperature=0
            )
            assert reply.choices[0].message.content
            took.append(time.perf_counter() - start)
        return took

    before = neighbour(20)
    refused: list[int] = []

    def hostile() -> None:
        for i in range(20):
            answer = httpx.post(
                f"{stack.url}/generate",
                headers={"X-Tier": "small"},
                timeout=60,
                json={"inputs": "Hi", "parameters": {"grammar": {"type": "regex",
                      "value": f"{EXPLODING}x{i}"}}},  # each one new: no verdict kept yet
            )  # fmt: skip
            refused.append(answer.status_code)

    attack = threading.Thread(target=hostile)
    attack.start()
    during = neighbour(20)
    attack.join()
    assert refused == [422] * 20
    assert stack.engines() == engines  # no engine restarted
    p50 = (statistics.median(before), statistics.median(during))
    p99 = (max(before), max(during))
    print(f"neighbour p50 {p50[0] * 1000:.0f} -> {p50[1] * 1000:.0f} ms, "
          f"max {p99[0] * 1000:.0f} -> {p99[1] * 1000:.0f} ms")  # fmt: skip
    assert p99[1] < p99[0] * 3 + 0.5  # within noise of a 2-core machine, never seconds
