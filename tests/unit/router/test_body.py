"""Request bodies: bounded in size as they arrive, nesting and text checked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serve_app.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from serve_app.router.body import (
    BODY_ALLOWANCE,
    BodyLimits,
    parse_json,
    read_bounded,
    read_json,
    tier_body_bytes,
)


async def parts(*chunks: bytes, pause_s: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(pause_s)
        yield chunk


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "nests deeper"),
        (b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}", "nests deeper than 64"),
        (b'{"a": "\\ud800"}', "not valid Unicode"),
        (b'{"\\udc00": 1}', "not valid Unicode"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": Infinity}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_bad_bodies_are_invalid_requests(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_json(raw, 64)


def test_a_good_body_parses() -> None:
    assert parse_json(b'{"a": [1, {"b": "\\u00e9\\ud83d\\ude00"}]}', 64) == {"a": [1, {"b": "é😀"}]}


def test_a_declared_or_arriving_body_over_the_limit_is_refused() -> None:
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_bounded(parts(b"x"), "1000", 10))

    consumed: list[bytes] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            consumed.append(b"x" * 100)
            yield consumed[-1]

    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_bounded(endless(), None, 1000))
    assert len(consumed) == 11  # stopped as soon as it was over


def test_a_slow_body_times_out() -> None:
    limits = BodyLimits(1000, 0.1, 64)
    with pytest.raises(RequestTimeout):
        asyncio.run(read_json(parts(b"{", b"}", pause_s=1), None, limits, 1000))


def test_a_body_is_bounded_by_the_largest_tier_the_caller_may_use() -> None:
    limits = BodyLimits(2_000_000, 1.0, 64, {"small": 100_000, "large": 300_000})
    assert limits.max_bytes_for(None) == 300_000
    assert limits.max_bytes_for(frozenset({"small"})) == 100_000
    assert limits.max_bytes_for(frozenset({"small", "large"})) == 300_000
    assert limits.max_bytes_for(frozenset({"gone"})) == 2_000_000  # no known tier: the router's
    assert BodyLimits(50_000, 1.0, 64, {"large": 300_000}).max_bytes_for(None) == 50_000


def test_a_tier_body_bound_grows_with_its_input_tokens() -> None:
    assert tier_body_bytes(1536, 32) == 1536 * 32 + BODY_ALLOWANCE
    assert tier_body_bytes(3072, 32) > tier_body_bytes(1536, 32)


def test_sixty_thousand_messages_are_refused_unread_for_a_local_tier() -> None:
    """The body the hostile tenant sent: 60,000 empty messages (1.8 MB) never reaches the
    parser when the largest tier takes 3,072 input tokens."""
    message = b'{"role":"user","content":""},'
    body = b'{"model":"m","messages":[' + message * 60_000 + b"]}"
    limit = tier_body_bytes(3072, 32)
    with pytest.raises(PayloadTooLarge, match=f"limit of {limit} bytes"):
        asyncio.run(read_bounded(parts(body), str(len(body)), limit))
