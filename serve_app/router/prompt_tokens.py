"""A prompt's tokens as the tier's engine counts them, for the token quota's reservation.

The engine's own tokenizer and chat template decide (TGI's `/chat_tokenize` for chat, with the
tools and `tool_prompt` it adds to the prompt; `/tokenize` for a prompt or TGI's `inputs`; on an
engine that speaks OpenAI's API only, vLLM's `/tokenize` with the messages or the prompt), so
emoji, CJK and tool definitions cost what they really cost, and an honest English prompt is not
charged a token per character. Each distinct prompt is asked once per tier and remembered.

When the engine cannot say within the time bound, the count falls back to the prompt's
characters, which is what a reservation was before this count existed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from ..engine.client import EngineReply
from ..tier.call import EngineRoute, TierCall
from ..tracing import RequestTrace

logger = logging.getLogger("ray.serve")

# What the chat template reads of a chat request; the rest (sampling) does not change the count.
_CHAT_FIELDS = ("model", "messages", "tools", "tool_choice", "tool_prompt")


class TierRequests(Protocol):
    async def request(self, tier: str, call: TierCall, trace: RequestTrace) -> EngineReply: ...


def tokenize_call(call: TierCall, protocol: Literal["tgi", "openai"] = "tgi") -> TierCall | None:
    """The engine call that tokenizes `call`'s prompt as the engine will (None: no route can)."""
    payload = call.payload
    route: EngineRoute
    if protocol == "openai":
        return _openai_tokenize(call)
    if call.route == "/v1/chat/completions":
        asked: Mapping[str, Any] = {k: payload[k] for k in _CHAT_FIELDS if k in payload}
        route = "/chat_tokenize"
    elif call.route == "/v1/completions" and isinstance(payload.get("prompt"), str):
        asked, route = {"inputs": payload["prompt"]}, "/tokenize"
    elif call.route in ("/generate", "/generate_stream", "/") and isinstance(
        payload.get("inputs"), str
    ):
        asked, route = {"inputs": payload["inputs"]}, "/tokenize"
    else:
        return None
    return TierCall(route, asked, False, 0, call.prompt_chars)


def _openai_tokenize(call: TierCall) -> TierCall | None:
    """vLLM's `/tokenize`: the chat's messages and tools through its template, or the prompt."""
    payload = call.payload
    if call.route == "/v1/chat/completions":
        asked = {k: payload[k] for k in ("model", "messages", "tools") if k in payload}
        asked["add_generation_prompt"] = True
    elif call.route == "/v1/completions" and isinstance(payload.get("prompt"), str):
        asked = {"model": payload.get("model"), "prompt": payload["prompt"]}
    else:
        return None
    return TierCall("/tokenize", asked, False, 0, call.prompt_chars)


def token_count(reply: EngineReply) -> int:
    """The number of tokens in a tokenize answer (TGI's list of tokens, `/chat_tokenize`'s
    `tokenize_response`, or a `count`); raises `ValueError` for anything else."""
    if reply.status != 200:
        raise ValueError(f"tokenize answered {reply.status}")
    answer = json.loads(reply.body)
    if isinstance(answer, dict) and isinstance(answer.get("tokenize_response"), list):
        answer = answer["tokenize_response"]
    if isinstance(answer, list):
        return len(answer)
    if isinstance(answer, dict) and type(answer.get("count")) is int:
        return int(answer["count"])
    raise ValueError("tokenize answered an unknown shape")


class PromptTokens:
    """Counts prompts with each tier's engine, remembering the last `size` distinct ones."""

    def __init__(
        self,
        engines: TierRequests,
        timeout_s: float,
        protocols: Mapping[str, Literal["tgi", "openai"]] | None = None,
        size: int = 4096,
    ) -> None:
        self._engines = engines
        self._protocols = dict(protocols or {})  # tier -> its engine's API (default TGI's)
        self._timeout_s = timeout_s
        self._size = size
        self._known: OrderedDict[tuple[str, str], int] = OrderedDict()

    async def count(self, tier: str, call: TierCall) -> int:
        """The prompt's tokens; its characters when the engine cannot say in time."""
        ask = tokenize_call(call, self._protocols.get(tier, "tgi"))
        if ask is None:
            return call.prompt_chars
        key = (tier, _digest(ask))
        known = self._known.get(key)
        if known is not None:
            self._known.move_to_end(key)
            return known
        try:
            async with asyncio.timeout(self._timeout_s):  # passes on a cancellation, always
                reply = await self._engines.request(tier, ask, RequestTrace())
            tokens = token_count(reply)
        except Exception as exc:  # the engine's or Ray's failure, whatever it is called
            logger.warning(
                "tier %s could not count a prompt's tokens (%s); charging its characters",
                tier, type(exc).__name__,
            )  # fmt: skip
            return call.prompt_chars
        self._known[key] = tokens
        if len(self._known) > self._size:
            self._known.popitem(last=False)
        return tokens


def _digest(call: TierCall) -> str:
    text = json.dumps(call.payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return call.route + ":" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
