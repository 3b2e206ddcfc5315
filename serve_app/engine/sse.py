"""The one Server-Sent Events parser: lines in, `data` payloads out."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def sse_data(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """Yield each event's data; multi-line data is joined with newlines, as the spec says."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # comments (":") and other fields (event, id, retry) carry nothing we use
    if data:
        yield "\n".join(data)
