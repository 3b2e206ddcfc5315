"""The headers Ray Serve's own ingress reads, made safe before it reads them.

Serve's HTTP server (each router replica's own, behind HAProxy, and Serve's proxy) decodes a few
headers as UTF-8 before any of the application's code runs: bytes that are not UTF-8 there end in
Serve's own 500. This ASGI middleware runs first (installed through Serve's
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, see `serve_app.serve_env.INGRESS_GUARDS`):

- an `x-request-id` that is not UTF-8 is replaced with a fresh id (the answer carries the id
  used, as for a request that sent none): the id only labels the request;
- a non-UTF-8 value in any other header Serve reads (`x-session-id`, the multiplexed model id,
  the per-request timeout and disconnect headers, `traceparent`, `tracestate`) changes how the
  request is served, so it is refused: 400 `invalid_request_error` on the OpenAI routes, 422
  `validation` on TGI's, naming the header.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InvalidRequest
from .errors import api_error

Headers = list[tuple[bytes, bytes]]

REQUEST_ID = b"x-request-id"
# The other headers Serve 2.60 decodes as UTF-8 on its way in (names compared lower-case, with
# `_` as `-`, as Serve compares the session and model-id headers).
READ_BY_SERVE = frozenset(
    {
        "x-session-id",
        "serve-multiplexed-model-id",
        "x-request-timeout-seconds",
        "x-request-disconnect-disabled",
        "traceparent",
        "tracestate",
    }
)


@dataclass(frozen=True)
class BadHeader:
    """A header Serve reads whose value is not UTF-8."""

    name: str

    def error(self) -> InvalidRequest:
        return InvalidRequest(f"the `{self.name}` header must be UTF-8 text", param=self.name)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _normal(name: bytes) -> str:
    return name.decode("latin-1").lower().replace("_", "-")


def screen(headers: Headers, new_id: Callable[[], str]) -> Headers | BadHeader:
    """The headers Serve may read: non-UTF-8 request ids replaced (all by one fresh id), or the
    first other header Serve reads that is not UTF-8."""
    fresh: bytes | None = None
    screened: Headers = []
    for name, value in headers:
        if _is_utf8(value):
            screened.append((name, value))
        elif name.lower() == REQUEST_ID:
            fresh = fresh or new_id().encode()
            screened.append((name, fresh))
        elif _normal(name) in READ_BY_SERVE:
            return BadHeader(_normal(name))
        else:
            screened.append((name, value))  # Serve does not read it; the router reads latin-1
    return screened


class HeaderScreen:
    """`screen` in front of Serve's HTTP server: fixed headers go on, a bad one is answered."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        screened = screen(scope["headers"], lambda: str(uuid.uuid4()))
        if isinstance(screened, BadHeader):
            tgi = not scope.get("path", "").startswith("/v1/")
            await api_error(screened.error()).response(tgi=tgi)(scope, receive, send)
            return
        await self._app({**scope, "headers": screened}, receive, send)


def middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    return [Middleware(HeaderScreen)]
