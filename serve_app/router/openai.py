"""OpenAI's API over TGI's: requests checked and bounded, answers normalised.

TGI's OpenAI layer answers with an empty `id`, its own model id, `finish_reason` values such as
"stop_sequence", usage inside the last choice chunk, and errors as `{"error", "error_type"}`.
Strict clients trip on each; this module turns them into what OpenAI's API returns.
"""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class Bound:
    """An OpenAI sampling field's allowed range, narrowed where TGI's is narrower."""

    name: str
    low: float
    high: float
    low_open: bool = False  # the low end itself is refused
    integer: bool = False
    neutral: float | None = None  # a value meaning "off", left out of the engine's payload

    def check(self, value: Any) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if not number or (self.integer and not whole):
            kind = "an integer" if self.integer else "a number"
            raise InvalidRequest(f"`{self.name}` must be {kind}", param=self.name)
        if not (self.low < value if self.low_open else self.low <= value) or value > self.high:
            low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
            raise InvalidRequest(
                f"`{self.name}` is {value}; it must be {low} and <= {self.high:g}",
                param=self.name,
            )


BOUNDS = (
    Bound("temperature", 0, 2),
    # TGI refuses top_p 1 (and 0); 1 means no nucleus cut, so it is simply not sent.
    Bound("top_p", 0, 1, low_open=True, neutral=1),
    # TGI turns presence_penalty p into repetition_penalty p + 2, which must be > 0; 0 is
    # OpenAI's "off", which TGI would read as a repetition penalty of 2.
    Bound("presence_penalty", -2, 2, low_open=True, neutral=0),
    Bound("frequency_penalty", -2, 2, neutral=0),
    Bound("top_logprobs", 0, 20, integer=True),
    Bound("seed", 0, 2**64 - 1, integer=True),
)
MAX_STOP_SEQUENCES = 4  # OpenAI's limit, and TGI's default `--max-stop-sequences`


def bounded_sampling(kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
    """Check OpenAI's sampling fields; the payload fields TGI should see, in TGI's types."""
    out: dict[str, Any] = {}
    for bound in BOUNDS:
        value = body.get(bound.name)
        if value is None:
            continue
        bound.check(value)
        out[bound.name] = None if value == bound.neutral else value
    logprobs = body.get("logprobs")
    if kind == "chat" and logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest("`logprobs` must be a boolean", param="logprobs")
    if kind == "chat" and body.get("top_logprobs") is not None and not logprobs:
        raise InvalidRequest("`top_logprobs` needs `logprobs` set to true", param="top_logprobs")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]  # TGI takes only a list
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest(
                "`stop` must be a non-empty string or an array of them", param="stop"
            )
        if len(stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(
                f"`stop` has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                param="stop",
            )
        out["stop"] = stop
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequest("`logit_bias` must be an object", param="logit_bias")
        if bias:
            raise InvalidRequest("`logit_bias` is not supported by this model", param="logit_bias")
        out["logit_bias"] = None  # TGI's field is a list; an empty map means nothing
    return out


def check_tools(body: dict[str, Any]) -> None:
    """The shape of `tools`; choosing among them (and TGI's refusals) is the engine's."""
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("`tools` must be an array", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise InvalidRequest(
                f'`tools[{i}]` must be {{"type": "function", "function": {{"name": ...}}}}',
                param=f"tools[{i}]",
            )


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
    n = body.get("n")
    if n is not None and n != 1:
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
    sampling = bounded_sampling(kind, body)
    check_tools(body)
    payload = {k: v for k, v in body.items() if k not in ("max_completion_tokens", "n")}
    payload.update(sampling)
    payload = {k: v for k, v in payload.items() if not (k in sampling and v is None)}
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
        self._deltas = DeltaState()

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
        choices = self._choices(engine_body.get("choices") or [])
        for choice in choices:
            message = choice.get("message")
            if isinstance(message, dict) and message.get("tool_calls"):
                message.setdefault("content", None)
                message["tool_calls"] = [_call(c) for c in message["tool_calls"]]
                choice["finish_reason"] = "tool_calls"
        return {
            **self._header(self._object),
            "system_fingerprint": engine_body.get("system_fingerprint"),
            "choices": choices,
            "usage": engine_body.get("usage"),
        }

    def chunk(self, engine_chunk: dict[str, Any]) -> list[bytes]:
        """SSE events for one engine chunk (usage split into its own final chunk, as OpenAI
        sends it, and only when the client asked for it)."""
        usage = engine_chunk.get("usage")
        if usage:
            self.usage = usage
        obj = "chat.completion.chunk" if self._request.kind == "chat" else "text_completion"
        choices = self._choices(engine_chunk.get("choices") or [])
        if self._request.kind == "chat":
            choices = [self._deltas.delta(c) for c in choices]
        fingerprint = engine_chunk.get("system_fingerprint")
        events = []
        if choices or not usage:
            events.append(
                sse({**self._header(obj), "system_fingerprint": fingerprint, "choices": choices})
            )
        if usage:
            # TGI ends a tool-call stream without a finishing chunk; OpenAI clients expect one.
            events += [
                sse({**self._header(obj), "system_fingerprint": fingerprint, "choices": [c]})
                for c in self._deltas.unfinished()
            ]
        if usage and self._request.include_usage:
            events.append(sse({**self._header(obj), "choices": [], "usage": usage}))
        return events


def _call(call: dict[str, Any]) -> dict[str, Any]:
    """A whole tool call in OpenAI's shape: the arguments as a JSON string."""
    function = call.get("function")
    if isinstance(function, dict) and not isinstance(function.get("arguments"), str):
        call = {**call, "function": {**function, "arguments": json.dumps(function["arguments"])}}
    return call


class DeltaState:
    """Streamed chat deltas in OpenAI's shape.

    TGI repeats `role` in every delta, and a tool call's `id`, `type` and (as null) `name` in
    every fragment; OpenAI sends each once, in the first delta (for a tool call: its first
    fragment), and clients that join fragments by concatenation rely on that. A choice that
    streamed tool calls finishes with "tool_calls".
    """

    def __init__(self) -> None:
        self._started: set[int] = set()
        self._calls: dict[int, set[int]] = {}  # choice index -> tool-call indexes seen
        self._finished: set[int] = set()

    def delta(self, choice: dict[str, Any]) -> dict[str, Any]:
        index = choice.get("index", 0)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return choice
        delta = dict(delta)
        if index in self._started:
            delta.pop("role", None)
        self._started.add(index)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            delta["tool_calls"] = [self._fragment(index, c) for c in calls]
            if "role" in delta:
                delta.setdefault("content", None)
        if choice.get("finish_reason"):
            self._finished.add(index)
            if index in self._calls:
                choice = {**choice, "finish_reason": "tool_calls"}
        return {**choice, "delta": delta}

    def _fragment(self, choice: int, call: Any) -> Any:
        if not isinstance(call, dict):
            return call
        seen = self._calls.setdefault(choice, set())
        position = call.get("index", 0)
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        if position in seen:
            return {"index": position, "function": {"arguments": function.get("arguments", "")}}
        seen.add(position)
        return {
            "index": position,
            "id": call.get("id"),
            "type": call.get("type", "function"),
            "function": {"name": function.get("name"), "arguments": function.get("arguments", "")},
        }

    def unfinished(self) -> list[dict[str, Any]]:
        """Finishing choices for tool-call streams the engine ended without one."""
        ends = [i for i in sorted(self._calls) if i not in self._finished]
        self._finished.update(ends)
        return [
            {"index": i, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"} for i in ends
        ]


sse = json_event
SSE_DONE = DONE
