"""The engine client (`serve_app.engine.client`) against real HTTP servers on 127.0.0.1: replies
with the engine's headers, streams in batches, every transport failure translated once into the
project's errors, and no engine address in anything a client would be shown."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from serve_app.engine.client import EngineClient, EngineConnections, reply_error, stream_error
from serve_app.errors import EngineReplyError, EngineUnavailable, EngineUnreachable
from serve_app.router.errors import api_error

TGI_HEADERS = {
    "x-compute-type": "1-cpu", "x-compute-time": "0.25", "x-compute-characters": "5",
    "x-total-time": "251", "x-validation-time": "1", "x-queue-time": "0",
    "x-inference-time": "250", "x-time-per-token": "125", "x-prompt-tokens": "3",
    "x-generated-tokens": "2",
}  # fmt: skip
KEY = "engine-key"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def engine(**routes: Handler) -> AsyncIterator[str]:
    """An HTTP server answering `routes` (`generate` serves `/generate`); its base URL."""
    app = web.Application()
    for name, handler in routes.items():
        app.router.add_route("*", "/" + name, handler)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client(url: str, timeout_s: float = 5) -> AsyncIterator[EngineClient]:
    engine_client = EngineClient(url, timeout_s, api_key=KEY)
    try:
        yield engine_client
    finally:
        await engine_client.aclose()


def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def sse(request: web.Request, *pieces: bytes, pause_s: float = 0.05) -> web.StreamResponse:
    reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await reply.prepare(request)
    for piece in pieces:
        await reply.write(piece)
        await asyncio.sleep(pause_s)
    await reply.write_eof()
    return reply


def test_a_reply_carries_the_engines_own_headers_and_the_key_goes_with_each_call() -> None:
    seen: list[tuple[str | None, Any]] = []

    async def generate(request: web.Request) -> web.Response:
        seen.append((request.headers.get("authorization"), await request.json()))
        headers = {**TGI_HEADERS, "x-request-id": "engine"}
        return web.json_response({"generated_text": "Paris"}, headers=headers)

    async def run() -> Any:
        async with engine(generate=generate) as url, client(url) as c:
            return await c.post("/generate", {"inputs": "a"}, {"traceparent": "00-ab-cd-01"})

    reply = asyncio.run(run())
    assert reply.status == 200 and json.loads(reply.body) == {"generated_text": "Paris"}
    assert dict(reply.headers) == TGI_HEADERS  # every x- header but the request id
    assert reply.header("x-generated-tokens") == "2"
    assert seen == [(f"Bearer {KEY}", {"inputs": "a"})]


def test_health_info_and_metrics() -> None:
    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"model_id": "m"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="tgi_queue_size 3\n")

    async def run() -> tuple[bool, dict[str, Any], str, bool]:
        async with engine(health=health, info=info, metrics=metrics) as url, client(url) as c:
            answers = await c.healthy(), await c.info(), await c.metrics()
        async with client(f"http://127.0.0.1:{closed_port()}") as gone:
            return (*answers, await gone.healthy())

    assert asyncio.run(run()) == (True, {"model_id": "m"}, "tgi_queue_size 3\n", False)


def test_a_stream_comes_in_batches_of_what_each_read_completed() -> None:
    async def generate_stream(request: web.Request) -> web.StreamResponse:
        # Two events in one write, then one split across two writes.
        return await sse(request, b"data: a\n\ndata: b\n\n", b"data: c", b"\n\n")

    async def run() -> list[list[str]]:
        async with engine(generate_stream=generate_stream) as url, client(url) as c:
            return [batch async for batch in c.stream("/generate_stream", {})]

    assert asyncio.run(run()) == [["a", "b"], ["c"]]


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (429, {"error": "Model is overloaded", "error_type": "overloaded"}, "overloaded"),
        (422, {"error": "temperature must be > 0", "error_type": "validation"}, "validation"),
        (500, {"error": "CUDA out of memory", "error_type": "generation"}, "generation"),
    ],
)
def test_an_error_status_is_tgis_error_before_any_item(
    status: int, body: dict[str, str], kind: str
) -> None:
    async def generate_stream(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    async def run() -> tuple[EngineReplyError, EngineReplyError]:
        routes = {"generate_stream": generate_stream, "info": generate_stream}
        async with engine(**routes) as url, client(url) as c:
            with pytest.raises(EngineReplyError) as streamed:
                async for _ in c.stream("/generate_stream", {}):
                    raise AssertionError("no item may arrive")
            with pytest.raises(EngineReplyError) as probed:
                await c.info()
        return streamed.value, probed.value

    for error in asyncio.run(run()):
        assert (error.status, error.message, error.error_type) == (status, body["error"], kind)


def test_a_refused_connection_is_unreachable() -> None:
    """Nothing was sent: the call may go to another replica."""

    async def run() -> None:
        async with client(f"http://127.0.0.1:{closed_port()}") as c:
            await c.post("/generate", {})

    with pytest.raises(EngineUnreachable, match="refused the connection for /generate"):
        asyncio.run(run())


def test_no_answer_within_the_bound_is_unavailable() -> None:
    async def generate(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    async def run() -> None:
        async with engine(generate=generate) as url, client(url, timeout_s=0.2) as c:
            await c.post("/generate", {})

    with pytest.raises(EngineUnavailable, match="did not answer /generate in time") as caught:
        asyncio.run(run())
    assert not isinstance(caught.value, EngineUnreachable)  # it may have started generating


def test_a_stream_the_engine_cuts_is_unavailable() -> None:
    async def generate_stream(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        await reply.prepare(request)
        await reply.write(b"data: a\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # the engine died mid-answer
        return reply

    async def run() -> list[list[str]]:
        batches: list[list[str]] = []
        async with engine(generate_stream=generate_stream) as url, client(url) as c:
            with pytest.raises(EngineUnavailable, match="connection failed"):
                async for batch in c.stream("/generate_stream", {}):
                    batches.append(batch)
        return batches

    assert asyncio.run(run()) == [["a"]]


def test_closing_a_stream_closes_the_engines_request() -> None:
    async def run() -> bool:
        ended = asyncio.Event()

        async def generate_stream(request: web.Request) -> web.StreamResponse:
            try:
                return await sse(request, *[b"data: x\n\n"] * 1000, pause_s=0.01)
            finally:
                ended.set()  # cancelled (the router hung up) or its write failed

        async with engine(generate_stream=generate_stream) as url, client(url) as c:
            stream = c.stream("/generate_stream", {})
            assert await anext(stream) == ["x"]
            await stream.aclose()  # type: ignore[attr-defined]
            await asyncio.wait_for(ended.wait(), 5)
            return ended.is_set()

    assert asyncio.run(run())


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
        try:
            async with client(f"http://127.0.0.1:{port}") as c:
                try:
                    return (await c.post("/generate", {})).status, seen
                except EngineUnavailable as exc:
                    return exc.message, seen
        finally:
            server.close()

    assert asyncio.run(run(answer_from=2)) == (200, [1, 2])
    failed, seen = asyncio.run(run(answer_from=3))
    assert seen == [1, 2] and failed == "the engine's connection failed during /generate"


def test_one_client_serves_calls_from_several_event_loops() -> None:
    """Each loop gets its own session: the router's unit tests run one `asyncio.run` after
    another on one router."""

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"model_id": "m"})

    async def run(connections: EngineConnections) -> str:
        async with engine(info=info) as url:
            return str((await EngineClient(url, 5, connections=connections).info())["model_id"])

    connections = EngineConnections()
    assert [asyncio.run(run(connections)) for _ in range(2)] == ["m", "m"]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_no_engine_address_reaches_a_client() -> None:
    """Every transport failure, as the router would answer it on either protocol, names
    neither the engine's address nor the library's exception; the log has both, and so has
    the error's cause."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()

    async def cut(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        await reply.prepare(request)
        await reply.write(b"data: a\n\n")
        assert request.transport is not None
        request.transport.close()
        return reply

    async def failures() -> tuple[list[Exception], list[str]]:
        caught: list[Exception] = []
        server, _ = await closing_server(answer_from=3)
        closing = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with engine(slow=slow, cut=cut) as url:
            calls = [
                (f"http://127.0.0.1:{closed_port()}", "post", "/generate"),
                (url, "post", "/slow"),
                (url, "stream", "/cut"),
                (closing, "post", "/generate"),
            ]
            for base, kind, path in calls:
                async with client(base, timeout_s=0.2) as c:
                    try:
                        if kind == "post":
                            await c.post(path, {})
                        else:
                            async for _ in c.stream(path, {}):
                                pass
                    except EngineUnavailable as exc:
                        caught.append(exc)
        server.close()
        return caught, [url, closing]

    records = Records()
    logger = logging.getLogger("ray.serve")
    logger.addHandler(records)
    try:
        caught, urls = asyncio.run(failures())
    finally:
        logger.removeHandler(records)
    assert len(caught) == 4
    for exc in caught:
        error = api_error(exc)
        shown = json.dumps([error.openai_body(), error.tgi_body()])
        assert "127.0.0.1" not in shown and "http" not in shown, shown
        for url in urls:
            assert url.rsplit(":", 1)[1] not in shown, shown
        assert not re.search(r"Client\w*Error|aiohttp|Errno|\w+\(", shown), shown
        assert exc.__cause__ is not None  # the library's own words, for the log
    assert all("127.0.0.1" in line for line in records.lines) and len(records.lines) == 4


@pytest.mark.parametrize(
    ("data", "status", "kind"),
    [
        ('{"error": "bad", "error_type": "validation"}', 422, "validation"),
        ('{"error": "oom", "error_type": "generation"}', 424, "generation"),
        ('{"error": "?", "error_type": "incomplete_generation"}', 500, "incomplete_generation"),
    ],
)
def test_stream_errors_get_tgis_status(data: str, status: int, kind: str) -> None:
    error = stream_error(data)
    assert (error.status, error.error_type) == (status, kind)


def test_a_body_that_is_not_tgis_is_kept_as_text() -> None:
    error = reply_error(502, b"<html>bad gateway</html>")
    assert error.message == "<html>bad gateway</html>" and error.error_type == ""
