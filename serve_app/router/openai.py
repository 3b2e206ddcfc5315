"""OpenAI's API over TGI's: requests checked and bounded, answers normalised.

TGI's OpenAI layer answers with an empty `id`, its own model id, `finish_reason` values such as
"stop_sequence", usage inside the last choice chunk, and errors as `{"error", "error_type"}`.
Strict clients trip on each; this module turns them into what OpenAI's API returns.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from ..config import TierConfig
from ..errors import InvalidRequest
from .sse import DONE, json_event

Kind = Literal["chat", "completion"]
ENGINE_PATH: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "stop": "stop", "length": "length"}


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked request: which API, the client's model name, and the engine's payload."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    payload: dict[str, Any]

    @property
    def engine_path(self) -> str:
        return ENGINE_PATH[self.kind]


def parse_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` is required and must be a string", param="model")
    return model


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"`{name}` must be a positive integer", param=name)
    return value


def parse_request(kind: Kind, body: dict[str, Any], model: str, tier: TierConfig) -> OpenAIRequest:
    """Check what the router is responsible for; sampling details are the engine's to check."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("`messages` must be a non-empty array", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"`messages[{i}]` must be an object with a string `role`",
                    param=f"messages[{i}]",
                )
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest(
                "`prompt` must be a non-empty string (or an array holding one)", param="prompt"
            )
    n = body.get("n", 1)
    if n != 1:
        raise InvalidRequest("only `n` = 1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", param="stream_options")
    include_usage = bool(stream and options and options.get("include_usage"))

    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _positive_int(body, name) or tier.default_max_tokens
    if max_tokens > tier.max_tokens_limit:
        raise InvalidRequest(
            f"`{name}` is {max_tokens}, above this model's limit of {tier.max_tokens_limit}",
            param=name,
        )
    payload = {k: v for k, v in body.items() if k not in ("max_completion_tokens", "n")}
    payload["max_tokens"] = max_tokens
    payload["model"] = tier.engine.model_id
    if kind == "completion":
        payload["prompt"] = prompt
    if stream:
        # Usage is always asked of the engine; the router shows it only when the client asked.
        payload["stream_options"] = {"include_usage": True}
    return OpenAIRequest(kind, model, stream, include_usage, payload)


class Normaliser:
    """Rewrites one request's engine answers into OpenAI's form."""

    def __init__(self, request: OpenAIRequest) -> None:
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        self._request = request
        self._id = f"{prefix}-{uuid.uuid4().hex}"
        self._created = int(time.time())
        self._object = "chat.completion" if request.kind == "chat" else "text_completion"
        self.usage: dict[str, int] | None = None

    def _header(self, obj: str) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": obj,
            "created": self._created,
            "model": self._request.model,
        }

    def _choices(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for choice in choices:
            reason = choice.get("finish_reason")
            # TGI sends "" on completion chunks that do not finish; OpenAI sends null
            choice["finish_reason"] = FINISH_REASONS.get(reason, reason) if reason else None
        return choices

    def complete(self, engine_body: dict[str, Any]) -> dict[str, Any]:
        return {
            **self._header(self._object),
            "system_fingerprint": engine_body.get("system_fingerprint"),
            "choices": self._choices(engine_body.get("choices") or []),
            "usage": engine_body.get("usage"),
        }

    def chunk(self, engine_chunk: dict[str, Any]) -> list[bytes]:
        """SSE events for one engine chunk (usage split into its own final chunk, as OpenAI
        sends it, and only when the client asked for it)."""
        usage = engine_chunk.get("usage")
        if usage:
            self.usage = usage
        obj = "chat.completion.chunk" if self._request.kind == "chat" else "text_completion"
        events = [
            sse(
                {
                    **self._header(obj),
                    "system_fingerprint": engine_chunk.get("system_fingerprint"),
                    "choices": self._choices(engine_chunk.get("choices") or []),
                }
            )
        ]
        if usage and self._request.include_usage:
            events.append(sse({**self._header(obj), "choices": [], "usage": usage}))
        return events


sse = json_event
SSE_DONE = DONE
