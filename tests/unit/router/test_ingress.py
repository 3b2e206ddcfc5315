"""The headers Serve's ingress reads: a bad request id replaced, other bad ones refused."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve_app.router.ingress import BadHeader, HeaderScreen, screen

NOT_UTF8 = b"\xff\xfe"


def fresh() -> str:
    return "fresh-id"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-request-id", b"trace-42")], [(b"x-request-id", b"trace-42")]),
        ([(b"x-request-id", "été".encode())], [(b"x-request-id", "été".encode())]),
        ([(b"x-request-id", NOT_UTF8)], [(b"x-request-id", b"fresh-id")]),
        ([(b"X-Request-ID", NOT_UTF8), (b"x-request-id", b"\xc3")],
         [(b"X-Request-ID", b"fresh-id"), (b"x-request-id", b"fresh-id")]),
        ([(b"x-note", NOT_UTF8)], [(b"x-note", NOT_UTF8)]),  # Serve does not read it
        ([(b"x-session-id", NOT_UTF8)], BadHeader("x-session-id")),
        ([(b"X_Session_Id", NOT_UTF8)], BadHeader("x-session-id")),
        ([(b"serve_multiplexed_model_id", NOT_UTF8)], BadHeader("serve-multiplexed-model-id")),
        ([(b"x-request-timeout-seconds", NOT_UTF8)], BadHeader("x-request-timeout-seconds")),
        ([(b"x-request-disconnect-disabled", NOT_UTF8)],
         BadHeader("x-request-disconnect-disabled")),
        ([(b"traceparent", NOT_UTF8)], BadHeader("traceparent")),
        ([(b"tracestate", NOT_UTF8)], BadHeader("tracestate")),
        ([(b"x-session-id", b"conversation-7")], [(b"x-session-id", b"conversation-7")]),
    ],
)  # fmt: skip
def test_screen(headers: list[tuple[bytes, bytes]], expected: object) -> None:
    assert screen(headers, fresh) == expected


def echo_app() -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"x-request-id": request.headers.get("x-request-id")})

    routes = [Route(path, echo, methods=["POST"]) for path in ("/v1/chat/completions", "/generate")]
    return Starlette(routes=routes, middleware=[Middleware(HeaderScreen)])


def post(path: str, headers: dict[str, bytes]) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=echo_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await client.post(path, headers=headers, json={})

    return asyncio.run(send())


def test_a_bad_request_id_is_replaced_and_the_request_goes_on() -> None:
    reply = post("/v1/chat/completions", {"x-request-id": NOT_UTF8})
    assert reply.status_code == 200
    sent = reply.json()["x-request-id"]
    assert sent and len(sent) == 36  # a fresh UUID


def test_another_bad_header_is_refused_in_each_protocols_shape() -> None:
    openai = post("/v1/chat/completions", {"x-session-id": NOT_UTF8})
    assert openai.status_code == 400
    assert openai.json()["error"]["type"] == "invalid_request_error"
    assert openai.json()["error"]["param"] == "x-session-id"
    assert "`x-session-id` header must be UTF-8" in openai.json()["error"]["message"]
    tgi = post("/generate", {"traceparent": NOT_UTF8})
    assert tgi.status_code == 422
    assert tgi.json()["error_type"] == "validation" and "traceparent" in tgi.json()["error"]
