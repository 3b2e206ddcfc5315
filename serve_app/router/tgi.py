"""TGI's own routes through the router: bodies pass unchanged, except the tier's token limits.

Left to itself TGI generates up to `max_total_tokens - input_length` when `max_new_tokens` is
unset; the router applies the tier's `default_max_tokens` and `max_tokens_limit` here as on the
OpenAI routes, so no route can ask for more than the operator allowed.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..config import TierConfig
from ..engine.client import EngineReply
from ..errors import InvalidRequest
from ..tier.call import EngineRoute, TierCall
from .accounting import Usage, prompt_estimate


def bounded(body: dict[str, Any], tier: TierConfig) -> tuple[dict[str, Any], int]:
    """The body with `max_new_tokens` set and within the tier's limit, and that limit."""
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("`parameters` must be an object", param="parameters")
    asked = parameters.get("max_new_tokens")
    if asked is None:
        parameters = {**parameters, "max_new_tokens": tier.default_max_tokens}
        return {**body, "parameters": parameters}, tier.default_max_tokens
    if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        raise InvalidRequest(
            f"`max_new_tokens` must be a positive integer, not {json.dumps(asked)[:40]}",
            param="parameters.max_new_tokens",
        )
    if asked > tier.max_tokens_limit:
        raise InvalidRequest(
            f"`max_new_tokens` is {asked}, above this tier's limit of {tier.max_tokens_limit}",
            param="parameters.max_new_tokens",
        )
    return body, asked


def tgi_call(route: EngineRoute, body: dict[str, Any], tier: TierConfig, stream: bool) -> TierCall:
    payload, max_tokens = bounded(body, tier)
    inputs = body.get("inputs")
    return TierCall(
        route, payload, stream, max_tokens, len(inputs) if isinstance(inputs, str) else 0
    )


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
