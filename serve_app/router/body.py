"""A request's JSON body, read within bounds: size (chunked bodies included), time, nesting,
and text that can be encoded again (no lone surrogates). Anything else is the client's error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect

from ..errors import InvalidRequest, PayloadTooLarge, RequestTimeout

BODY_ALLOWANCE = 65_536  # bytes of a body beyond its prompt's: sampling fields, tool schemas


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int
    timeout_s: float
    max_depth: int
    # The most bytes a body for each tier may hold, from its `max_input_tokens`: what no tier
    # the caller may use could take is refused before it is parsed.
    tier_bytes: Mapping[str, int] = field(default_factory=dict)

    def max_bytes_for(self, tiers: frozenset[str] | None) -> int:
        """The limit for a caller that may use `tiers` (None: all)."""
        caps = [b for t, b in self.tier_bytes.items() if tiers is None or t in tiers]
        return min(self.max_bytes, max(caps)) if caps else self.max_bytes


def tier_body_bytes(max_input_tokens: int, bytes_per_token: int) -> int:
    """A generous bound on the body of a request whose prompt fits `max_input_tokens`: JSON's
    escapes and the fields around the prompt included."""
    return max_input_tokens * bytes_per_token + BODY_ALLOWANCE


async def read_bounded(chunks: AsyncIterator[bytes], declared: str | None, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to be too large (declared or as it arrives)."""
    too_large = PayloadTooLarge(f"the request body is over the limit of {max_bytes} bytes")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    parts, size = [], 0
    async for part in chunks:
        size += len(part)
        if size > max_bytes:
            raise too_large
        parts.append(part)
    return b"".join(parts)


def parse_json(raw: bytes, max_depth: int) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest(f"the request body nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    check_values(body, max_depth)
    return body


def check_values(body: Any, max_depth: int) -> None:
    """Nesting within `max_depth`, and every string encodable as UTF-8 (JSON's `\\ud800`
    escapes decode to lone surrogates that nothing downstream can send)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _encodable(value)
        elif isinstance(value, (dict, list)):
            if depth > max_depth:
                raise InvalidRequest(f"the request body nests deeper than {max_depth} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _encodable(key)
                stack.append((item, depth + 1))


def _encodable(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the request body holds a string that is not valid Unicode (a lone surrogate escape "
            "such as \\ud800)"
        ) from None


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON, though Python's parser takes them."""
    raise ValueError(f"{name} is not a JSON value")


async def read_json(
    chunks: AsyncIterator[bytes], declared: str | None, limits: BodyLimits, max_bytes: int
) -> dict[str, Any]:
    try:
        async with asyncio.timeout(limits.timeout_s):  # passes on a cancellation, always
            raw = await read_bounded(chunks, declared, max_bytes)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {limits.timeout_s:g}s"
        ) from None
    except ClientDisconnect:
        raise InvalidRequest("the client closed the connection before sending the body") from None
    return parse_json(raw, limits.max_depth)
