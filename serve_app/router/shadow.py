"""Shadow traffic: a copy of a stable-served request sent to the tier's candidate in the
background, its answer discarded and compared with the stable one (latency, errors, completion
tokens, how alike the texts are). Never billed (no quota, no admission turn, not in flight),
never waited for by the client; a copy the candidate has no room for is dropped and counted.

`compare`, `answer_text` and `sse_text` are pure; `Shadows` runs the copies of one router
replica, at most `MAX_IN_FLIGHT` per candidate at a time.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from ..engine.client import EngineReply
from ..errors import EngineReplyError, TierOverloaded, TierUnavailable
from ..tier.call import TierCall
from .accounting import Recorder
from .errors import api_error
from .requests import GenerateRequest, OpenAIRequest
from .tgi import reply_usage
from .versions import Target, Versions

logger = logging.getLogger("ray.serve")
MAX_IN_FLIGHT = 8  # copies one router replica keeps in flight per candidate
MAX_TEXT_CHARS = 4000  # of each answer compared (difflib is quadratic at worst)


@dataclass(frozen=True)
class Outcome:
    """One version's answer to a request: its status, duration, completion tokens and text."""

    status: int
    seconds: float
    completion_tokens: int | None
    text: str | None


@dataclass(frozen=True)
class Comparison:
    """What `MetricsRecorder.shadowed` records: `result` ok, error or dropped, and the ratios
    and similarity where both answers are in."""

    result: str
    latency_ratio: float | None = None
    token_ratio: float | None = None
    similarity: float | None = None


def similarity(a: str, b: str) -> float:
    """How alike two texts are, 0..1 (difflib's ratio over whitespace-normalised text)."""
    left = " ".join(a.split())[:MAX_TEXT_CHARS]
    right = " ".join(b.split())[:MAX_TEXT_CHARS]
    if not left and not right:
        return 1.0
    return difflib.SequenceMatcher(None, left, right, autojunk=False).ratio()


def compare(stable: Outcome | None, candidate: Outcome) -> Comparison:
    """The candidate's copy against the stable answer (None: the stable answer never came)."""
    if candidate.status >= 500 or candidate.status == 0:
        return Comparison("error")
    if candidate.status != 200 or stable is None or stable.status != 200:
        return Comparison("ok")
    latency = candidate.seconds / stable.seconds if stable.seconds > 0 else None
    tokens = None
    if candidate.completion_tokens is not None and stable.completion_tokens:
        tokens = candidate.completion_tokens / stable.completion_tokens
    alike = None
    if candidate.text is not None and stable.text is not None:
        alike = similarity(stable.text, candidate.text)
    return Comparison("ok", latency, tokens, alike)


def answer_text(body: Any) -> str | None:
    """The text of a whole answer: OpenAI's (chat or completion) or TGI's."""
    if isinstance(body, list) and body:
        body = body[0]  # TGI's `POST /` answers with a list of one
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("generated_text"), str):
        return str(body["generated_text"])
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
        if isinstance(choice.get("text"), str):
            return str(choice["text"])
    return None


def sse_text(body: bytes) -> str:
    """The text a streamed answer carried: OpenAI chunks' deltas, or TGI events' tokens (a
    stream's `generated_text` at its end is not added twice)."""
    parts: list[str] = []
    for line in body.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data.startswith("{"):
            continue
        try:
            event = json.loads(data)
        except ValueError:
            continue
        token = event.get("token")
        if (
            isinstance(token, dict)
            and not token.get("special")
            and isinstance(token.get("text"), str)
        ):
            parts.append(token["text"])
            continue
        for choice in event.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                parts.append(delta["content"])
            elif isinstance(choice, dict) and isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    return "".join(parts)


def reply_outcome(reply: EngineReply, seconds: float) -> Outcome:
    """A whole answer from an engine (the candidate's copy)."""
    try:
        body = json.loads(reply.body)
    except ValueError:
        body = None
    tokens: int | None = None
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        tokens = usage["completion_tokens"]
    elif reply.status == 200 and answer_text(body) is not None:  # TGI's answer
        tokens = reply_usage(reply, 0).completion_tokens
    return Outcome(reply.status, seconds, tokens, answer_text(body))


def shadow_call(parsed: OpenAIRequest | GenerateRequest, target: Target) -> TierCall:
    """The copy's call to the candidate: the same request, answered whole."""
    if isinstance(parsed, OpenAIRequest):
        call = replace(parsed, stream=False, include_usage=False).call(target.config)
        payload = {k: v for k, v in call.payload.items() if k != "stream_options"}
        return replace(call, payload={**payload, "stream": False})
    body = {k: v for k, v in parsed.passthrough.items() if k != "stream"}
    return replace(parsed, route="/generate", stream=False, passthrough=body).call(target.config)


class ShadowCopy:
    """A copy under way: the stable answer is handed to it once the request settles."""

    def __init__(self) -> None:
        self.stable: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()

    def settled(self, outcome: Outcome | None) -> None:
        if not self.stable.done():
            self.stable.set_result(outcome)


Send = Callable[[str, TierCall], Awaitable[EngineReply]]


class Shadows:
    """The shadow copies of one router replica."""

    def __init__(self, recorder: Recorder, background: set[asyncio.Future[None]]) -> None:
        self._recorder = recorder
        self._background = background
        self._in_flight: dict[str, int] = {}

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    def start(
        self, target: Target, call: TierCall, send: Send, versions: Versions, timeout_s: float
    ) -> ShadowCopy | None:
        """Send `call` to candidate `target` in the background (None: dropped, no room)."""
        if self.in_flight(target.key) >= MAX_IN_FLIGHT:
            self._recorder.shadowed(target.tier, target.version, Comparison("dropped"))
            return None
        copy = ShadowCopy()
        self._in_flight[target.key] = self.in_flight(target.key) + 1
        task = asyncio.ensure_future(self._run(target, call, send, versions, copy, timeout_s))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return copy

    async def _run(
        self,
        target: Target,
        call: TierCall,
        send: Send,
        versions: Versions,
        copy: ShadowCopy,
        timeout_s: float,
    ) -> None:
        start = time.perf_counter()
        released = False
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    reply = await send(target.key, call)
                outcome = reply_outcome(reply, time.perf_counter() - start)
            except (TierOverloaded, TierUnavailable, EngineReplyError) as exc:
                # A candidate that is busy, or not serving yet (no replica, still starting):
                # the copy is dropped, and judges nothing.
                if isinstance(exc, (TierOverloaded, TierUnavailable)) or exc.status == 429:
                    self._recorder.shadowed(target.tier, target.version, Comparison("dropped"))
                    return
                outcome = Outcome(exc.status, time.perf_counter() - start, None, None)
            except Exception as exc:
                status = api_error(exc).status
                outcome = Outcome(status, time.perf_counter() - start, None, None)
            if outcome.status == 429:
                self._recorder.shadowed(target.tier, target.version, Comparison("dropped"))
                return
            # Errors only: a whole answer's duration is not what a streamed client waits for.
            rollback = versions.observe(target.key, outcome.status, None)
            if rollback is not None:
                self._recorder.rolled_back(target.tier, target.version, rollback.code)
            self._release(target.key)  # the candidate has answered: its slot is free
            released = True
            try:
                async with asyncio.timeout(timeout_s):
                    stable = await copy.stable
            except TimeoutError:
                stable = None
            self._recorder.shadowed(target.tier, target.version, compare(stable, outcome))
        except Exception:
            logger.exception("a shadow copy to %s failed", target.key)
        finally:
            if not released:
                self._release(target.key)

    def _release(self, key: str) -> None:
        self._in_flight[key] = self.in_flight(key) - 1


async def tapped(events: AsyncIterator[bytes], into: bytearray) -> AsyncIterator[bytes]:
    """A streamed answer's bytes as they go out, also kept in `into` (shadowed requests only)."""
    try:
        async for data in events:
            into += data
            yield data
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
