"""OpenAI's answers from TGI's: what the engine sends, in OpenAI's form (the requests are parsed in
`serve_app.router.requests`).

TGI's OpenAI layer answers with an empty `id`, its own model id, `finish_reason` values such as
"stop_sequence", usage inside the last choice chunk, and errors as `{"error", "error_type"}`.
Strict clients trip on each; this module turns them into what OpenAI's API returns.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..engine.sse import DONE, json_event
from .requests import OpenAIRequest
from .splice import Splicer

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "stop": "stop", "length": "length"}


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
        obj = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
        header = json.dumps(self._header(obj), separators=(",", ":"))[:-1]
        deltas = self._deltas
        self._splicer = Splicer(
            header, request.kind == "chat", lambda: deltas.started(0), lambda: deltas.start(0)
        )

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

    def event(self, data: str) -> tuple[bytes, int] | None:
        """A plain chunk (one token, nothing finished, no usage) rewritten without parsing it,
        and the tokens it carries; None for any other, which `chunk` takes
        (`serve_app.router.splice`)."""
        return self._splicer.event(data)

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

    def started(self, index: int) -> bool:
        return index in self._started

    def start(self, index: int) -> None:
        self._started.add(index)

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
