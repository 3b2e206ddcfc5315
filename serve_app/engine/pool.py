"""The router's own HTTP connections to engines: one pooled session per process, calls to any
engine by URL and key, for the direct data path (`serve_app.router.direct`).

aiohttp rather than the supervisor's httpx client: on this path every streamed chunk of every
request crosses it, and aiohttp reads and splits lines at a fraction of httpx's cost per chunk.
Transport failures become `EngineUnavailable`, error statuses `EngineReplyError`: the only place
where aiohttp exceptions are translated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..errors import EngineUnavailable, EngineUnreachable
from .client import EngineReply, passed_headers, reply_error
from .sse import Batch, sse_batches

CONNECT_TIMEOUT_S = 5.0
# An idle pooled connection is closed by this side well before the engine would close it
# (the local engine after 90 s, see `serve_app.local_engine`): a request then never goes out
# on a connection the engine is closing at that moment.
KEEPALIVE_S = 60.0


@dataclass(frozen=True)
class EngineRequest:
    """One call to one engine: where (`url`, the engine's own `api_key`), what (`path`,
    `payload`, `headers` such as a W3C `traceparent`), and its bound, start to last byte."""

    url: str
    api_key: str = field(repr=False)
    path: str = "/"
    payload: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 300.0


class EnginePool:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use, inside the event loop that serves requests.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=None
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    @asynccontextmanager
    async def _translated(self, url: str, path: str) -> AsyncIterator[None]:
        try:
            yield
        except TimeoutError as exc:
            raise EngineUnavailable(f"engine {url} did not answer {path} in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise EngineUnreachable(f"engine {url} refused {path}: {exc!r}") from exc
        except aiohttp.ClientError as exc:
            raise EngineUnavailable(f"engine {url} unreachable for {path}: {exc!r}") from exc

    @asynccontextmanager
    async def _sent(self, request: EngineRequest) -> AsyncIterator[aiohttp.ClientResponse]:
        """The engine's answer to `request`, its failures translated while it is read."""
        async with (
            self._translated(request.url, request.path),  # entered first: it translates the next
            await self._answered(request) as reply,
        ):
            yield reply

    async def _answered(self, request: EngineRequest) -> aiohttp.ClientResponse:
        """The engine's answer (status and headers). A pooled connection that the engine
        closed just as it was reused fails before any answer; the request is then sent once
        more, since the engine never answered it."""
        headers = {**request.headers, "authorization": f"Bearer {request.api_key}"}
        for attempt in range(2):
            try:
                return await self._http().post(
                    request.url + request.path,
                    json=request.payload,
                    headers=headers,
                    timeout=_timeout(request.timeout_s),
                )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError):
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def post(self, request: EngineRequest) -> EngineReply:
        """The engine's whole answer. Cancelling the caller closes the connection, and the
        engine drops the request."""
        async with self._sent(request) as reply:
            body = await reply.read()
            return EngineReply(reply.status, body, passed_headers(reply.headers))

    async def stream(self, request: EngineRequest) -> AsyncIterator[Batch]:
        """SSE data payloads, batched as each read of the connection completes them (see
        `serve_app.engine.sse`). A non-200 answer raises before anything is yielded; closing
        the iterator closes the connection, which is how the engine learns to stop generating."""
        async with self._sent(request) as reply:
            if reply.status != 200:
                raise reply_error(reply.status, await reply.read())
            try:
                async for batch in sse_batches(reply.content.iter_any()):
                    yield batch
            except BaseException:
                reply.close()  # unfinished: drop the connection, never reuse it
                raise

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _timeout(total_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total_s, sock_connect=CONNECT_TIMEOUT_S)
