"""Request bodies: bounded in size as they arrive, nesting and text checked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serve_app.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from serve_app.router.body import BodyLimits, parse_json, read_bounded, read_json


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
        asyncio.run(read_json(parts(b"{", b"}", pause_s=1), None, limits))
