"""TGI's answers through the router: the tokens a whole answer or a streamed event carries (the
requests are parsed in `serve_app.router.requests`)."""

from __future__ import annotations

import json
import math

from ..engine.client import EngineReply
from .accounting import Usage, prompt_estimate


def reply_usage(reply: EngineReply, prompt_chars: int) -> Usage:
    """Tokens of a whole TGI answer: the engine's `x-prompt-tokens`/`x-generated-tokens`
    headers, else `details.generated_tokens`, else estimated from the text."""
    prompt, generated = reply.header("x-prompt-tokens"), reply.header("x-generated-tokens")
    if prompt is not None and generated is not None and prompt.isdigit() and generated.isdigit():
        return Usage(int(prompt), int(generated))
    try:
        answer = json.loads(reply.body)
    except ValueError:
        answer = None
    if isinstance(answer, list) and answer:
        answer = answer[0]  # `POST /` answers with a list of one
    completion = 0
    if isinstance(answer, dict):
        details = answer.get("details")
        if isinstance(details, dict) and isinstance(details.get("generated_tokens"), int):
            completion = details["generated_tokens"]
        elif isinstance(answer.get("generated_text"), str):
            completion = math.ceil(len(answer["generated_text"]) / 4)
    return Usage(prompt_estimate(prompt_chars), completion)


def stream_tokens(data: str) -> int:
    """Generated tokens in one event of TGI's stream: one per `token` event."""
    return 1 if data.startswith("{") and '"token"' in data else 0
