"""Engines for the router's unit tests, over real HTTP: each engine is a function of the request
(an `httpx.Request`, a plain value here) to an `httpx.Response` or a coroutine of one, served by
aiohttp on 127.0.0.1. The server runs in a thread of its own, so that it outlives the event loop
of each `asyncio.run` a test makes; a client that hangs up cancels its handler, as TGI drops
the request."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import threading
from collections.abc import Awaitable, Callable

import httpx
from aiohttp import web

Engine = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
# Set by aiohttp for the answer it writes; the engine's own value would contradict it.
HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


class EngineServer:
    """One HTTP server; each engine `serve` is given answers under a path prefix of its own."""

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._names = itertools.count()
        self._loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run, name="unit-test-engines", daemon=True)
        thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._started(), self._loop).result(10)

    def serve(self, engine: Engine) -> str:
        """The base URL at which `engine` answers."""
        name = f"engine-{next(self._names)}"
        self._engines[name] = engine
        return f"{self.url}/{name}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _started(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{engine}/{path:.*}", self._answer)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        engine = self._engines[request.match_info["engine"]]
        asked = httpx.Request(
            request.method,
            f"http://engine/{request.match_info['path']}",
            headers=list(request.headers.items()),
            content=await request.read(),
        )
        answer = engine(asked)
        if inspect.isawaitable(answer):
            answer = await answer
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            body = answer.content
        except httpx.ResponseNotRead:  # a stream: written as the engine makes it
            reply = web.StreamResponse(status=answer.status_code, headers=headers)
            await reply.prepare(request)
            with contextlib.suppress(ConnectionError):  # the router hung up
                async for piece in answer.aiter_raw():
                    await reply.write(piece)
                await reply.write_eof()
            return reply
        return web.Response(status=answer.status_code, body=body, headers=headers)


@functools.cache
def engine_server() -> EngineServer:
    """The test session's one server."""
    return EngineServer()
