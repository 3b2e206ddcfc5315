"""What the router hands a tier: one typed call, built once per request by a front end."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..engine.tgi_over_openai import TgiAnswer

EngineRoute = Literal[
    "/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream", "/",
    "/tokenize", "/chat_tokenize",
]  # fmt: skip


@dataclass(frozen=True)
class TierCall:
    """A checked request for the engine: its route and payload (limits already applied), and
    the traits accounting needs (tokens the answer may use, prompt size)."""

    route: EngineRoute
    payload: Mapping[str, Any]
    stream: bool
    max_tokens: int
    prompt_chars: int
    # The router's W3C trace context (`serve_app.tracing`), empty when tracing is off.
    trace: Mapping[str, str] = field(default_factory=dict)
    # A TGI request sent to an engine that speaks OpenAI only: how its answer becomes TGI's
    # (`serve_app.engine.tgi_over_openai`, applied by `serve_app.router.dispatch`).
    answer: TgiAnswer | None = None

    @property
    def token_estimate(self) -> int:
        """Tokens the call may use at most, for a quota reservation: the prompt's characters
        (a token is at least one character, chat templates add a few per message) plus the
        tokens asked for."""
        return self.prompt_chars + self.max_tokens
