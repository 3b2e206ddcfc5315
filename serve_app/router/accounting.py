"""What a request's settlement counts and where it goes: tokens used (`Usage`, from the engine's
own count or estimated), requests in flight per tier (`InFlight`), and the `Recorder` that
takes outcomes (the application's metrics, or a list in tests). `RequestLife` in
`serve_app.router.lifecycle` does the counting."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

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
    def first_token(self, tier: str, seconds: float, version: str = ...) -> None: ...
    def between_tokens(self, tier: str, seconds: float, version: str = ...) -> None: ...
    def finished(
        self, tier: str, status: int, seconds: float, usage: Usage, version: str = ...
    ) -> None: ...
    def rolled_back(self, tier: str, version: str, reason: str) -> None: ...
    def shadowed(self, tier: str, version: str, comparison: Any) -> None: ...
    def refused(self, tier: str, status: int) -> None: ...
    def spill_over(self, tier: str, to_tier: str) -> None: ...
    def tenant_request(self, tenant: str, tier: str) -> None: ...
    def tenant_tokens(self, tenant: str, tier: str, tokens: int, feature: str | None) -> None: ...
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
