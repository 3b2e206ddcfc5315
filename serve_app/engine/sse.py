"""Server-Sent Events: the one parser (bytes as they arrive in, `data` payloads out, in batches)
and the one encoder of `data:` events (`event`, `json_event`, `DONE`).

A batch is every event completed by one read of the connection. Under light load that is one
event; when the reader falls behind the engine, several, and the router then handles and writes
them together: its cost per event drops as its load grows instead of its queue growing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

Batch = list[str]  # the data payloads of the events one read completed, in order
DONE = b"data: [DONE]\n\n"


def event(data: str) -> bytes:
    """One `data:` event holding `data` as it is (the engine's own JSON, passed through)."""
    return b"data: " + data.encode() + b"\n\n"


def json_event(payload: Any) -> bytes:
    return event(json.dumps(payload, separators=(",", ":")))


class EventSplitter:
    """Feed it the stream's bytes in any pieces; it returns each completed event's data.

    Multi-line data is joined with newlines, as the spec says; comments (`:`) and the other
    fields (event, id, retry) carry nothing the project uses and are skipped. Lines end with
    LF or CRLF; bytes are decoded per whole line, so a character split across reads is intact.
    """

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[str] = []

    def feed(self, piece: bytes) -> Batch:
        if (
            not self._tail
            and not self._data
            and piece.startswith(b"data:")
            and piece.endswith(b"\n\n")
            and piece.count(b"\n") == 2
            and b"\r" not in piece
        ):  # the common piece: one whole one-line event
            value = piece[5:-2]
            return [(value[1:] if value.startswith(b" ") else value).decode()]
        lines = (self._tail + piece if self._tail else piece).split(b"\n")
        self._tail = lines.pop()
        events: Batch = []
        for line in lines:
            self._line(line[:-1] if line.endswith(b"\r") else line, events)
        return events

    def end(self) -> Batch:
        """What an unterminated last event (or line) held when the stream closed."""
        events: Batch = []
        if self._tail:
            tail, self._tail = self._tail, b""
            self._line(tail.removesuffix(b"\r"), events)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: bytes, events: Batch) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append((value[1:] if value.startswith(b" ") else value).decode())


async def sse_batches(pieces: AsyncIterable[bytes]) -> AsyncIterator[Batch]:
    """Non-empty batches of data payloads from a byte stream, as the reads complete them."""
    splitter = EventSplitter()
    async for piece in pieces:
        events = splitter.feed(piece)
        if events:
            yield events
    events = splitter.end()
    if events:
        yield events
