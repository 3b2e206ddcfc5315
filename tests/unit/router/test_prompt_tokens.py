"""A prompt's tokens as the tier's engine counts them: which engine route is asked, how its
answer is read, what is remembered, and what a failing engine costs (the characters)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve_app.engine.client import EngineReply
from serve_app.router.prompt_tokens import PromptTokens, token_count, tokenize_call
from serve_app.tier.call import TierCall
from serve_app.tracing import RequestTrace

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def chat(**fields: Any) -> TierCall:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
               "temperature": 0.5, **fields}  # fmt: skip
    return TierCall("/v1/chat/completions", payload, True, 9, 2)


def test_chat_is_counted_with_its_template_tools_and_tool_prompt() -> None:
    asked = tokenize_call(chat(tools=TOOLS, tool_prompt="Use them", tool_choice="auto"))
    assert asked is not None and asked.route == "/chat_tokenize"
    assert set(asked.payload) == {"model", "messages", "tools", "tool_prompt", "tool_choice"}
    assert not asked.stream  # sampling fields are left out: they change no token


@pytest.mark.parametrize(
    ("route", "payload", "inputs"),
    [
        ("/v1/completions", {"prompt": "Once upon", "max_tokens": 3}, "Once upon"),
        ("/generate", {"inputs": "Once", "parameters": {}}, "Once"),
        ("/generate_stream", {"inputs": "Once"}, "Once"),
        ("/", {"inputs": "Once", "stream": True}, "Once"),
    ],
)
def test_prompts_are_counted_with_tokenize(
    route: Any, payload: dict[str, Any], inputs: str
) -> None:
    asked = tokenize_call(TierCall(route, payload, False, 3, len(inputs)))
    assert asked is not None
    assert (asked.route, dict(asked.payload)) == ("/tokenize", {"inputs": inputs})


def test_a_prompt_no_route_can_count_is_not_asked() -> None:
    assert tokenize_call(TierCall("/v1/completions", {"prompt": [1, 2, 3]}, False, 3, 3)) is None


@pytest.mark.parametrize(
    ("body", "count"),
    [
        ([{"id": 1}, {"id": 2}], 2),  # TGI's /tokenize
        ({"tokenize_response": [{"id": 1}], "templated_text": "x"}, 1),  # TGI's /chat_tokenize
        ({"count": 7, "tokens": [], "max_model_len": 2048}, 7),  # vLLM's /tokenize
    ],
)
def test_tokenize_answers_are_read(body: Any, count: int) -> None:
    assert token_count(EngineReply(200, json.dumps(body).encode())) == count


@pytest.mark.parametrize(
    "reply",
    [EngineReply(404, b"{}"), EngineReply(200, b'{"count": "7"}'), EngineReply(200, b"nope")],
)
def test_other_answers_are_not_a_count(reply: EngineReply) -> None:
    with pytest.raises(ValueError):
        token_count(reply)


class Engines:
    """Tier calls answered in process: `tokens` per prompt, or a failure."""

    def __init__(self, tokens: int = 0, fail: bool = False, delay_s: float = 0.0) -> None:
        self.tokens, self.fail, self.delay_s = tokens, fail, delay_s
        self.asked: list[tuple[str, str]] = []

    async def request(self, tier: str, call: TierCall, trace: RequestTrace) -> EngineReply:
        self.asked.append((tier, call.route))
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("engine gone")
        return EngineReply(200, json.dumps([{"id": i} for i in range(self.tokens)]).encode())


def test_a_prompt_is_asked_once_per_tier_and_remembered() -> None:
    engines = Engines(tokens=11)
    prompts = PromptTokens(engines, timeout_s=1.0, size=2)

    async def counts() -> list[int]:
        return [
            await prompts.count("small", chat()),
            await prompts.count("small", chat(temperature=0.1)),  # same prompt, other sampling
            await prompts.count("large", chat()),
        ]

    assert asyncio.run(counts()) == [11, 11, 11]
    assert engines.asked == [("small", "/chat_tokenize"), ("large", "/chat_tokenize")]


def test_the_oldest_prompt_is_forgotten_first() -> None:
    engines = Engines(tokens=3)
    prompts = PromptTokens(engines, timeout_s=1.0, size=1)
    one = TierCall("/generate", {"inputs": "one"}, False, 1, 3)
    two = TierCall("/generate", {"inputs": "two"}, False, 1, 3)

    async def counts() -> None:
        for call in (one, two, one):
            await prompts.count("small", call)

    asyncio.run(counts())
    assert len(engines.asked) == 3


@pytest.mark.parametrize("engines", [Engines(fail=True), Engines(tokens=3, delay_s=5)])
def test_an_engine_that_cannot_count_in_time_costs_the_characters(engines: Engines) -> None:
    prompts = PromptTokens(engines, timeout_s=0.05)
    call = TierCall("/generate", {"inputs": "x" * 40}, False, 1, 40)
    assert asyncio.run(prompts.count("small", call)) == 40


def test_an_openai_only_engine_is_asked_with_its_own_tokenize() -> None:
    chat_ask = tokenize_call(chat(tools=TOOLS), "openai")
    assert chat_ask is not None and chat_ask.route == "/tokenize"
    assert set(chat_ask.payload) == {"model", "messages", "tools", "add_generation_prompt"}
    prompt_ask = tokenize_call(
        TierCall("/v1/completions", {"model": "m", "prompt": "Once"}, False, 3, 4), "openai"
    )
    assert prompt_ask is not None and dict(prompt_ask.payload) == {"model": "m", "prompt": "Once"}


def test_each_tier_is_asked_in_its_engines_terms() -> None:
    engines = Engines(tokens=2)
    prompts = PromptTokens(engines, timeout_s=1.0, protocols={"v": "openai"})
    asyncio.run(prompts.count("v", chat()))
    asyncio.run(prompts.count("small", chat()))
    assert engines.asked == [("v", "/tokenize"), ("small", "/chat_tokenize")]
