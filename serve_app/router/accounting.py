"""One generating request's bookkeeping, from admission to its end, whatever the end.

`RequestScope` counts the request in flight for its tier, times its first token and the gaps
between chunks, counts the tokens it produced (from the engine's usage when there is one, else
from the stream itself), and on `close` — success, error, client disconnect or cancellation —
records the outcome once, takes it out of flight and hands the tokens used to `on_tokens` (the
quota settlement). `close` is idempotent and never raises.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from starlette.requests import ClientDisconnect

from .errors import api_error

logger = logging.getLogger("ray.serve")
CLIENT_CLOSED = 499  # the client went away before the answer was complete


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Recorder(Protocol):
    """Where outcomes go (the application's metrics, or a list in tests)."""

    def in_flight(self, tier: str, count: int) -> None: ...
    def first_token(self, tier: str, seconds: float) -> None: ...
    def between_tokens(self, tier: str, seconds: float) -> None: ...
    def finished(self, tier: str, status: int, seconds: float, usage: Usage) -> None: ...
    def spill_over(self, tier: str, to_tier: str) -> None: ...
    def tenant_request(self, tenant: str, tier: str) -> None: ...
    def tenant_tokens(self, tenant: str, tier: str, tokens: int) -> None: ...
    def tenant_rejection(self, tenant: str, reason: str) -> None: ...


class InFlight:
    """Requests in flight per tier in this router replica (spill-over reads it too)."""

    def __init__(self, recorder: Recorder) -> None:
        self.by_tier: dict[str, int] = {}
        self._recorder = recorder

    def add(self, tier: str, delta: int) -> None:
        self.by_tier[tier] = self.by_tier.get(tier, 0) + delta
        self._recorder.in_flight(tier, self.by_tier[tier])


def usage_from(data: Any) -> Usage | None:
    """OpenAI's `usage` object, or TGI's `details` (whose prompt size it does not carry)."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if isinstance(usage, dict):
        return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
    return None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def prompt_estimate(prompt_chars: int) -> int:
    """Prompt tokens when the engine does not say (TGI's native streams): about four
    characters a token."""
    return math.ceil(prompt_chars / 4)


class RequestScope:
    def __init__(
        self,
        tier: str,
        in_flight: InFlight,
        recorder: Recorder,
        prompt_chars: int,
        on_tokens: Callable[[Usage], None],
        tgi: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`tgi`: statuses as TGI's routes answer them (see `router.errors`)."""
        self.tier = tier
        self.status = 200
        self._in_flight = in_flight
        self._recorder = recorder
        self._prompt_chars = prompt_chars
        self._on_tokens = on_tokens
        self._tgi = tgi
        self._clock = clock
        self._start = self._last = clock()
        self._first: float | None = None
        self._usage: Usage | None = None
        self._counted = 0
        self._closed = False
        self.ended = False  # a stream reached its end (else the client cut it)
        in_flight.add(tier, +1)

    def chunk(self, tokens: int = 0) -> None:
        """A streamed chunk arrived, carrying `tokens` generated tokens."""
        now = self._clock()
        if self._first is None:
            self._first = now
            self._recorder.first_token(self.tier, now - self._start)
        else:
            self._recorder.between_tokens(self.tier, now - self._last)
        self._last = now
        self._counted += tokens

    def report(self, usage: Usage | None) -> None:
        """The engine's own count, which wins over the counted chunks."""
        if usage is not None:
            self._usage = usage

    @property
    def usage(self) -> Usage:
        if self._usage is not None:
            return self._usage
        return Usage(prompt_estimate(self._prompt_chars) if self._counted else 0, self._counted)

    def close(self, exc: BaseException | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit, ClientDisconnect)):
            self.status = CLIENT_CLOSED
        elif exc is not None:
            error = api_error(exc)
            self.status = error.tgi_status() if self._tgi else error.status
        usage = self.usage
        try:
            self._in_flight.add(self.tier, -1)
            self._recorder.finished(self.tier, self.status, self._clock() - self._start, usage)
            self._on_tokens(usage)
        except Exception:  # bookkeeping must never turn an answer into an error
            logger.exception("request accounting failed")

    def __enter__(self) -> RequestScope:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(exc)
