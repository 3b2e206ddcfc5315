"""The engine's HTTP API as typed calls over one pooled connection pool.

Transport failures become `EngineUnavailable`, error statuses `EngineReplyError`: the only
place where httpx exceptions are translated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import EngineReplyError, EngineUnavailable, EngineUnreachable
from .sse import Batch, sse_batches

# Headers the engine sends that belong to the connection or to the router, not to the answer.
NOT_PASSED = frozenset({"x-request-id"})


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
    """TGI's `{"error", "error_type"}` body as an exception; any other body kept as text."""
    try:
        data = json.loads(body)
        return EngineReplyError(status, str(data["error"]), str(data.get("error_type", "")))
    except (ValueError, KeyError, TypeError):
        return EngineReplyError(status, body.decode(errors="replace")[:500], "")


# The status TGI gives each `error_type`; inside a stream the status is 200 and only the type
# says what went wrong.
TGI_ERROR_STATUS = {"validation": 422, "generation": 424, "overloaded": 429}


def stream_error(data: str) -> EngineReplyError:
    """An error event from inside an engine stream, with the status TGI would have used."""
    error = reply_error(200, data.encode())
    error.status = TGI_ERROR_STATUS.get(error.error_type, 500)
    return error


class EngineClient:
    def __init__(
        self,
        base_url: str,
        request_timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        """`transport` is httpx's own seam: tests hand in `httpx.MockTransport`. `api_key`
        is the engine's own (TGI's `--api-key`), sent with every call."""
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(request_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            transport=transport,
        )

    @asynccontextmanager
    async def _translated(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise EngineUnavailable(f"engine did not answer {what} in time") from exc
        except httpx.ConnectError as exc:
            raise EngineUnreachable(f"engine refused {what}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine unreachable for {what}: {exc!r}") from exc

    async def healthy(self) -> bool:
        try:
            reply = await self._http.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def info(self) -> dict[str, Any]:
        async with self._translated("/info"):
            reply = await self._http.get("/info", timeout=5.0)
        if reply.status_code != 200:
            raise reply_error(reply.status_code, reply.content)
        return dict(reply.json())

    async def metrics(self) -> str:
        async with self._translated("/metrics"):
            reply = await self._http.get("/metrics", timeout=2.0)
        return reply.text

    async def post(
        self, path: str, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> EngineReply:
        """Cancelling the caller closes the connection: the engine drops the request.
        `headers` (a W3C `traceparent`) go with the request."""
        async with self._translated(path):
            reply = await self._http.post(path, json=payload, headers=headers)
        return EngineReply(reply.status_code, reply.content, passed_headers(reply.headers))

    async def stream(
        self, path: str, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Batch]:
        """SSE data payloads, batched as each read completes them (`serve_app.engine.sse`).
        A non-200 answer raises before anything is yielded; closing the iterator closes the
        connection, which is how the engine learns to stop generating. `headers` (a W3C
        `traceparent`) go with the request."""
        request = self._http.stream("POST", path, json=payload, headers=headers)
        async with self._translated(path), request as reply:
            if reply.status_code != 200:
                raise reply_error(reply.status_code, await reply.aread())
            async for batch in sse_batches(reply.aiter_bytes()):
                yield batch

    async def aclose(self) -> None:
        await self._http.aclose()
