"""The router's engine pool (`serve_app.engine.pool`) against a real simulated engine that takes
only its own API key, as a tier replica starts it for the direct data path."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from serve_app.engine.pool import EnginePool, EngineRequest
from serve_app.errors import EngineReplyError, EngineUnavailable, EngineUnreachable
from tests.helpers import free_port, wait_for

from .conftest import RunningEngine, start_engine

KEY = "engine-only-key"
CHAT = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
GENERATE = {"inputs": "Hi", "parameters": {"max_new_tokens": 4}}
LONG = {"inputs": "Hi", "parameters": {"max_new_tokens": 50}}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    log = tmp_path_factory.mktemp("keyed-engine") / "engine.log"
    running = start_engine(
        log,
        "--model-id", "simulated", "--api-key", KEY, "--max-batch-size", "4",
        "--sim-ttft-ms", "5", "--sim-itl-ms", "40", "--sim-output-tokens", "50",
    )  # fmt: skip
    yield running
    running.process.terminate()


def running_requests(engine: RunningEngine) -> float:
    text = httpx.get(f"{engine.url}/metrics", timeout=5).text
    match = re.search(r"^tgi_batch_current_size (\S+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_streams_and_posts_with_the_engines_key(keyed: RunningEngine) -> None:
    async def run() -> tuple[list[str], int, bytes, dict[str, str]]:
        pool = EnginePool()
        try:
            chat = EngineRequest(keyed.url, KEY, "/v1/chat/completions", {**CHAT, "stream": True})
            chunks = [data async for batch in pool.stream(chat) for data in batch]
            reply = await pool.post(EngineRequest(keyed.url, KEY, "/generate", GENERATE))
            return chunks, reply.status, reply.body, dict(reply.headers)
        finally:
            await pool.aclose()

    chunks, status, body, headers = asyncio.run(run())
    assert chunks[-1] == "[DONE]"
    assert len(chunks) == 6 + 1  # six tokens, then [DONE]
    assert all(json.loads(c)["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert status == 200 and json.loads(body)["generated_text"]
    assert "x-request-id" not in headers


def test_a_wrong_key_is_the_engines_401_before_any_chunk(keyed: RunningEngine) -> None:
    async def run() -> EngineReplyError:
        pool = EnginePool()
        try:
            with pytest.raises(EngineReplyError) as caught:
                wrong = EngineRequest(keyed.url, "wrong", "/generate_stream", GENERATE)
                async for _ in pool.stream(wrong):
                    raise AssertionError("no chunk may arrive")
            return caught.value
        finally:
            await pool.aclose()

    assert asyncio.run(run()).status == 401


def test_an_engine_error_keeps_the_engines_status(keyed: RunningEngine) -> None:
    async def run() -> EngineReplyError:
        pool = EnginePool()
        try:
            with pytest.raises(EngineReplyError) as caught:
                bad = {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}
                async for _ in pool.stream(EngineRequest(keyed.url, KEY, "/generate_stream", bad)):
                    raise AssertionError("no chunk may arrive")
            return caught.value
        finally:
            await pool.aclose()

    error = asyncio.run(run())
    assert error.status == 422 and error.error_type == "validation"


def test_closing_a_stream_frees_the_engine_slot(keyed: RunningEngine) -> None:
    async def run() -> float:
        pool = EnginePool()
        try:
            stream = pool.stream(EngineRequest(keyed.url, KEY, "/generate_stream", LONG))
            await anext(stream)
            busy = running_requests(keyed)
            await stream.aclose()  # type: ignore[attr-defined]
            return busy
        finally:
            await pool.aclose()

    assert asyncio.run(run()) == 1
    wait_for(lambda: running_requests(keyed) == 0, 5, "the engine to drop the closed stream")


def test_a_call_past_its_bound_or_to_no_engine_is_unavailable(keyed: RunningEngine) -> None:
    async def run() -> tuple[str, str]:
        pool = EnginePool()
        try:
            bounded = EngineRequest(keyed.url, KEY, "/generate_stream", LONG, timeout_s=0.3)
            with pytest.raises(EngineUnavailable) as slow:
                async for _ in pool.stream(bounded):
                    pass
            nowhere = f"http://127.0.0.1:{free_port()}"
            with pytest.raises(EngineUnreachable) as gone:  # nothing sent: it may go elsewhere
                await pool.post(EngineRequest(nowhere, KEY, "/generate", GENERATE, timeout_s=5))
            return str(slow.value), str(gone.value)
        finally:
            await pool.aclose()

    slow, gone = asyncio.run(run())
    assert "did not answer /generate_stream in time" in slow
    assert "refused /generate" in gone
    wait_for(lambda: running_requests(keyed) == 0, 5, "the engine to drop the cut stream")


async def closing_server(answer_from: int) -> tuple[asyncio.Server, list[int]]:
    """An HTTP server that reads each request and closes its connection without an answer (a
    keep-alive connection the server closed just as it was reused) until its `answer_from`-th
    connection, which gets a 200."""
    seen: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen) + 1)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        await reader.readexactly(int(length.group(1)) if length else 0)
        if len(seen) >= answer_from:
            body = b'{"generated_text":"ok"}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, seen


def test_a_connection_closed_before_any_answer_is_tried_once_more() -> None:
    async def run(answer_from: int) -> tuple[int | str, list[int]]:
        server, seen = await closing_server(answer_from)
        port = server.sockets[0].getsockname()[1]
        pool = EnginePool()
        try:
            request = EngineRequest(f"http://127.0.0.1:{port}", KEY, "/generate", GENERATE)
            try:
                return (await pool.post(request)).status, seen
            except EngineUnavailable as exc:
                return str(exc), seen
        finally:
            await pool.aclose()
            server.close()

    assert asyncio.run(run(answer_from=2)) == (200, [1, 2])
    failed, seen = asyncio.run(run(answer_from=3))
    assert seen == [1, 2] and isinstance(failed, str) and "unreachable for /generate" in failed
