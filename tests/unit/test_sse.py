from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serve_app.engine.sse import sse_data


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


def parse(*lines: str) -> list[str]:
    async def collect() -> list[str]:
        return [d async for d in sse_data(_lines(*lines))]

    return asyncio.run(collect())


def test_tgi_framing_without_space_and_openai_framing_with_space() -> None:
    assert parse('data:{"a":1}', "", 'data: {"b":2}', "") == ['{"a":1}', '{"b":2}']


def test_multiline_data_comments_and_unterminated_last_event() -> None:
    assert parse(": ping", "data: x", "data: y", "", "event: e", "data: [DONE]") == [
        "x\ny",
        "[DONE]",
    ]
