from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serve_app.engine.sse import EventSplitter, sse_batches


def split(*pieces: bytes) -> list[list[str]]:
    """The batches each piece completes, then what the end adds (empty ones dropped)."""
    splitter = EventSplitter()
    batches = [splitter.feed(piece) for piece in pieces] + [splitter.end()]
    return [batch for batch in batches if batch]


def test_tgi_framing_without_space_and_openai_framing_with_space() -> None:
    assert split(b'data:{"a":1}\n\ndata: {"b":2}\n\n') == [['{"a":1}', '{"b":2}']]


def test_multiline_data_comments_and_unterminated_last_event() -> None:
    stream = b": ping\ndata: x\ndata: y\n\nevent: e\ndata: [DONE]"
    assert split(stream) == [["x\ny"], ["[DONE]"]]


def test_events_split_anywhere_across_reads_come_out_whole() -> None:
    stream = 'data: {"t":"é"}\r\n\r\ndata: {"t":"b"}\n\n'.encode()
    for cut in range(1, len(stream)):
        events = [e for batch in split(stream[:cut], stream[cut:]) for e in batch]
        assert events == ['{"t":"é"}', '{"t":"b"}'], cut


def test_one_read_holding_many_events_is_one_batch() -> None:
    stream = b"".join(b"data: %d\n\n" % i for i in range(5)) + b"data: 5"
    assert split(stream) == [["0", "1", "2", "3", "4"], ["5"]]


def test_batches_from_a_byte_stream_skip_reads_that_complete_nothing() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"data: a", b"\n", b"\n", b"data: b\n\nda", b"ta: c\n\n", b": ping\n"):
            yield piece

    async def collect() -> list[list[str]]:
        return [batch async for batch in sse_batches(pieces())]

    assert asyncio.run(collect()) == [["a"], ["b"], ["c"]]


def test_a_piece_holding_one_whole_event_reads_as_fed_byte_by_byte() -> None:
    pieces = [b"data: one\n\n", b"data:two\n\n", b"data: three\r\n\r\n", b"data:\n\n",
              b"data: a\nb\n\n", b": comment\n\n", b"data: \xc3\xa9\n\n"]  # fmt: skip
    for piece in pieces:
        whole, bytewise = EventSplitter(), EventSplitter()
        expected = [e for i in range(len(piece)) for e in bytewise.feed(piece[i : i + 1])]
        assert whole.feed(piece) == expected, piece
