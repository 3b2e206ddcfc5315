"""TGI's own routes through the router: bodies pass unchanged, except the tier's token limits.

Left to itself TGI generates up to `max_total_tokens - input_length` when `max_new_tokens` is
unset; the router applies the tier's `default_max_tokens` and `max_tokens_limit` here as on the
OpenAI routes, so no route can ask for more than the operator allowed.
"""

from __future__ import annotations

from typing import Any

from ..config import TierConfig
from ..errors import InvalidRequest


def bounded(body: dict[str, Any], tier: TierConfig) -> dict[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        return body  # the engine's validation answers this one
    asked = parameters.get("max_new_tokens")
    if asked is None:
        return {**body, "parameters": {**parameters, "max_new_tokens": tier.default_max_tokens}}
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > tier.max_tokens_limit:
        raise InvalidRequest(
            f"`max_new_tokens` is {asked}, above this tier's limit of {tier.max_tokens_limit}",
            param="parameters.max_new_tokens",
        )
    return body
