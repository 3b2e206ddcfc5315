"""The engine's HTTP API (TGI's protocol) as typed calls: `health`, `info`, `metrics`, `post`,
`stream`.

    EngineConnections   one aiohttp session per event loop; its connector keeps one pool of
                        keep-alive connections per engine address (host and port)
    EngineClient        one engine's address and key over such connections: cheap to make, so
                        the router makes one per lease

One session with a pool per address rather than a session per engine: the router talks to every
engine its leases name, and those come and go with replicas. Pools keyed by address need no
lifetime of their own (a gone engine's idle connections close after `KEEPALIVE_S`), and a lease
creates nothing. aiohttp rather than httpx: on the direct data path every streamed chunk crosses
this client, and aiohttp reads and splits lines at a fraction of httpx's cost per chunk.

`engine_errors` is the one place where the transport's exceptions become the project's
(`EngineUnreachable`, `EngineUnavailable`); error statuses become `EngineReplyError` with TGI's
`error`/`error_type`. A message may reach a client, so it names neither the engine's address nor
the library's exception: those are logged here, and kept as the error's `__cause__`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import EngineReplyError, EngineUnavailable, EngineUnreachable
from .sse import Batch, EventSplitter

logger = logging.getLogger("ray.serve")

CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 5.0  # /health and /info
METRICS_TIMEOUT_S = 2.0
# An idle pooled connection is closed by this side well before the engine would close it (the
# local engine after 90 s, see `serve_app.local_engine`): a request then never goes out on a
# connection the engine is closing at that moment.
KEEPALIVE_S = 60.0
# Headers the engine sends that belong to the connection or to the router, not to the answer.
NOT_PASSED = frozenset({"x-request-id"})
# The status TGI gives each `error_type`; inside a stream the status is 200 and only the type
# says what went wrong.
TGI_ERROR_STATUS = {"validation": 422, "generation": 424, "overloaded": 429}


@dataclass(frozen=True)
class EngineReply:
    """The engine's status, body and its own `x-*` headers (TGI's timings and token counts:
    `x-compute-time`, `x-prompt-tokens`, `x-generated-tokens`, ...), passed through."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


def passed_headers(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    lowered = ((k.lower(), v) for k, v in headers.items())
    return tuple((k, v) for k, v in lowered if k.startswith("x-") and k not in NOT_PASSED)


def reply_error(status: int, body: bytes) -> EngineReplyError:
    """TGI's `{"error", "error_type"}` body as an exception; vLLM's OpenAI-shaped `{"error":
    {"message", "type", ...}}` too, a refused request in TGI's terms (`validation`); any other
    body kept as text."""
    try:
        data = json.loads(body)
        error = data["error"]
        if isinstance(error, dict):  # vLLM
            kind = "validation" if status in (400, 422) else ""
            return EngineReplyError(status, str(error["message"]), kind)
        return EngineReplyError(status, str(error), str(data.get("error_type", "")))
    except (ValueError, KeyError, TypeError):
        return EngineReplyError(status, body.decode(errors="replace")[:500], "")


def stream_error(data: str) -> EngineReplyError:
    """An error event from inside an engine stream, with the status TGI would have used."""
    error = reply_error(200, data.encode())
    error.status = TGI_ERROR_STATUS.get(error.error_type, 500)
    return error


@contextmanager
def engine_errors(url: str, path: str, *, quiet: bool = False) -> Iterator[None]:
    """Transport failures of a call to the engine at `url` as the project's errors: the one
    place where they are translated. The address and the library's words go to the log (at
    debug level when `quiet`: a probe that expects failures) and stay on `__cause__`, never
    into the message."""
    level = logging.DEBUG if quiet else logging.WARNING
    try:
        yield
    except TimeoutError as exc:  # before OSError, which it subclasses; aiohttp's too
        logger.log(level, "engine %s: %s timed out: %r", url, path, exc)
        raise EngineUnavailable(f"the engine did not answer {path} in time") from exc
    except aiohttp.ClientConnectorError as exc:
        logger.log(level, "engine %s: no connection for %s: %r", url, path, exc)
        raise EngineUnreachable(f"the engine refused the connection for {path}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        logger.log(level, "engine %s: %s failed: %r", url, path, exc)
        raise EngineUnavailable(f"the engine's connection failed during {path}") from exc


class EngineConnections:
    """Keep-alive connections to any number of engines: one aiohttp session, made on first use
    inside the event loop that uses it (one made in another loop is left behind), with one pool
    per engine address. Answers are read as sent: no decompression, none asked for."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=None
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
            )
            self._loop = loop
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()


class EngineClient:
    """Typed calls to the engine at `url`. `api_key` is the engine's own (TGI's `--api-key`),
    sent with every call; `timeout_s` bounds a `post` or `stream` from its start to its last
    byte. Without `connections`, the client has its own, and `aclose` closes them."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        *,
        api_key: str | None = None,
        connections: EngineConnections | None = None,
    ) -> None:
        self.url = url
        self._auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = _timeout(timeout_s)
        self._owned = connections is None
        self._connections = connections if connections is not None else EngineConnections()

    def __repr__(self) -> str:
        return f"EngineClient({self.url!r})"

    async def healthy(self) -> bool:
        """Whether `/health` answers 200; an engine that cannot be reached is not healthy."""
        try:
            probe = _timeout(PROBE_TIMEOUT_S)
            async with self._sent("GET", "/health", timeout=probe, quiet=True) as reply:
                return reply.status == 200
        except EngineUnavailable:
            return False

    async def info(self) -> dict[str, Any]:
        async with self._sent("GET", "/info", timeout=_timeout(PROBE_TIMEOUT_S)) as reply:
            body = await reply.read()
        if reply.status != 200:
            raise reply_error(reply.status, body)
        try:
            info = json.loads(body)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise EngineReplyError(reply.status, "the engine's /info is not a JSON object", "")
        return info

    async def model_ids(self) -> list[str]:
        """The names the engine serves under, from OpenAI's `/v1/models` (vLLM's readiness)."""
        async with self._sent("GET", "/v1/models", timeout=_timeout(PROBE_TIMEOUT_S)) as reply:
            body = await reply.read()
        if reply.status != 200:
            raise reply_error(reply.status, body)
        try:
            data = json.loads(body)["data"]
            return [str(model["id"]) for model in data]
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineReplyError(
                reply.status, "the engine's /v1/models has no model list", ""
            ) from exc

    async def metrics(self) -> str:
        """The engine's Prometheus text (`serve_app.engine.stats` parses it)."""
        async with self._sent("GET", "/metrics", timeout=_timeout(METRICS_TIMEOUT_S)) as reply:
            body = await reply.read()
        if reply.status != 200:
            raise reply_error(reply.status, body)
        return body.decode(errors="replace")

    async def post(
        self, path: str, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> EngineReply:
        """The engine's whole answer. Cancelling the caller closes the connection, and the
        engine drops the request. `headers` (a W3C `traceparent`) go with the request."""
        async with self._sent("POST", path, payload, headers) as reply:
            body = await reply.read()
            return EngineReply(reply.status, body, passed_headers(reply.headers))

    async def stream(
        self, path: str, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Batch]:
        """SSE data payloads, batched as each read of the connection completes them (see
        `serve_app.engine.sse`). A non-200 answer raises before anything is yielded; closing
        the iterator closes the connection, which is how the engine learns to stop generating.
        `headers` (a W3C `traceparent`) go with the request."""
        async with self._sent("POST", path, payload, headers) as reply:
            if reply.status != 200:
                raise reply_error(reply.status, await reply.read())
            # Read as `sse_batches` does, without its generator layers: this runs per chunk.
            splitter, read = EventSplitter(), reply.content.readany
            try:
                while piece := await read():
                    batch = splitter.feed(piece)
                    if batch:
                        yield batch
                batch = splitter.end()
                if batch:
                    yield batch
            except BaseException:
                reply.close()  # unfinished: drop the connection, never reuse it
                raise

    async def aclose(self) -> None:
        if self._owned:
            await self._connections.aclose()

    @asynccontextmanager
    async def _sent(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        quiet: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The engine's answer (status and headers; the body is read inside), failures
        translated however far it was read."""
        with engine_errors(self.url, path, quiet=quiet):
            reply = await self._answered(method, path, payload, headers, timeout or self._timeout)
            async with reply:
                yield reply

    async def _answered(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """A pooled connection that the engine closed just as it was reused fails before any
        answer; the request is then sent once more, since the engine never answered it."""
        sent = {**headers, **self._auth} if headers else self._auth
        session = self._connections.session()
        for attempt in range(2):
            try:
                return await session.request(
                    method, self.url + path, json=payload, headers=sent, timeout=timeout
                )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError):
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _timeout(total_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total_s, sock_connect=CONNECT_TIMEOUT_S)
