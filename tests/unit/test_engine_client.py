"""The engine client over httpx's MockTransport: replies with the engine's headers, errors
translated once, streams that raise before their first item."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve_app.engine.client import EngineClient, reply_error, stream_error
from serve_app.errors import EngineReplyError, EngineUnavailable

TGI_HEADERS = {
    "x-compute-type": "1-cpu", "x-compute-time": "0.25", "x-compute-characters": "5",
    "x-total-time": "251", "x-validation-time": "1", "x-queue-time": "0",
    "x-inference-time": "250", "x-time-per-token": "125", "x-prompt-tokens": "3",
    "x-generated-tokens": "2",
}  # fmt: skip


def client(handler: httpx.MockTransport) -> EngineClient:
    return EngineClient("http://engine", 5, transport=handler)


def test_a_reply_carries_the_engines_own_headers() -> None:
    def engine(request: httpx.Request) -> httpx.Response:
        headers = {**TGI_HEADERS, "x-request-id": "engine", "content-type": "application/json"}
        return httpx.Response(200, json={"generated_text": "Paris"}, headers=headers)

    reply = asyncio.run(client(httpx.MockTransport(engine)).post("/generate", {"inputs": "a"}))
    assert dict(reply.headers) == TGI_HEADERS  # every x- header but the request id
    assert reply.header("x-generated-tokens") == "2"


def test_unreachable_engine_is_unavailable() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(EngineUnavailable):
        asyncio.run(client(httpx.MockTransport(down)).post("/generate", {}))


def test_a_stream_refused_raises_before_any_item() -> None:
    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429, json={"error": "Model is overloaded", "error_type": "overloaded"}
        )

    async def first() -> list[str]:
        async for batch in client(httpx.MockTransport(busy)).stream("/generate_stream", {}):
            return batch
        return []

    with pytest.raises(EngineReplyError) as caught:
        asyncio.run(first())
    assert (caught.value.status, caught.value.error_type) == (429, "overloaded")


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
