"""The engine client (`serve_app.engine.client`) against a real simulated engine that takes only
its own API key, as a tier replica starts it for the direct data path: one set of connections
shared by clients of each lease, as a router holds them."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from devstack.hosts import free_port
from serve_app.engine.client import EngineClient, EngineConnections
from serve_app.errors import EngineReplyError, EngineUnavailable, EngineUnreachable
from tests.helpers import wait_for

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


@asynccontextmanager
async def connections() -> AsyncIterator[EngineConnections]:
    shared = EngineConnections()
    try:
        yield shared
    finally:
        await shared.aclose()


def leased(
    url: str, pool: EngineConnections, key: str = KEY, timeout_s: float = 300
) -> EngineClient:
    """The client a router makes for one lease."""
    return EngineClient(url, timeout_s, api_key=key, connections=pool)


def test_streams_and_posts_with_the_engines_key(keyed: RunningEngine) -> None:
    async def run() -> tuple[list[str], int, bytes, dict[str, str], bool, str]:
        async with connections() as pool:
            engine = leased(keyed.url, pool)
            stream = engine.stream("/v1/chat/completions", {**CHAT, "stream": True})
            chunks = [data async for batch in stream for data in batch]
            reply = await leased(keyed.url, pool).post("/generate", GENERATE)
            healthy, info = await engine.healthy(), await engine.info()
            return chunks, reply.status, reply.body, dict(reply.headers), healthy, info["model_id"]

    chunks, status, body, headers, healthy, model = asyncio.run(run())
    assert chunks[-1] == "[DONE]"
    assert len(chunks) == 6 + 1  # six tokens, then [DONE]
    assert all(json.loads(c)["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert status == 200 and json.loads(body)["generated_text"]
    assert "x-request-id" not in headers
    assert healthy and model == "simulated"


def test_a_wrong_key_is_the_engines_401_before_any_chunk(keyed: RunningEngine) -> None:
    async def run() -> EngineReplyError:
        async with connections() as pool:
            with pytest.raises(EngineReplyError) as caught:
                async for _ in leased(keyed.url, pool, "wrong").stream(
                    "/generate_stream", GENERATE
                ):
                    raise AssertionError("no chunk may arrive")
            return caught.value

    assert asyncio.run(run()).status == 401


def test_an_engine_error_keeps_the_engines_status(keyed: RunningEngine) -> None:
    async def run() -> EngineReplyError:
        async with connections() as pool:
            with pytest.raises(EngineReplyError) as caught:
                bad = {"inputs": "Hi", "parameters": {"max_new_tokens": 0}}
                async for _ in leased(keyed.url, pool).stream("/generate_stream", bad):
                    raise AssertionError("no chunk may arrive")
            return caught.value

    error = asyncio.run(run())
    assert error.status == 422 and error.error_type == "validation"


def test_closing_a_stream_frees_the_engine_slot(keyed: RunningEngine) -> None:
    async def run() -> float:
        async with connections() as pool:
            stream = leased(keyed.url, pool).stream("/generate_stream", LONG)
            await anext(stream)
            busy = running_requests(keyed)
            await stream.aclose()  # type: ignore[attr-defined]
            return busy

    assert asyncio.run(run()) == 1
    wait_for(lambda: running_requests(keyed) == 0, 5, "the engine to drop the closed stream")


def test_a_call_past_its_bound_or_to_no_engine_is_unavailable(keyed: RunningEngine) -> None:
    async def run() -> tuple[str, str]:
        async with connections() as pool:
            with pytest.raises(EngineUnavailable) as slow:
                async for _ in leased(keyed.url, pool, timeout_s=0.3).stream(
                    "/generate_stream", LONG
                ):
                    pass
            nowhere = f"http://127.0.0.1:{free_port()}"
            with pytest.raises(EngineUnreachable) as gone:  # nothing sent: it may go elsewhere
                await leased(nowhere, pool, timeout_s=5).post("/generate", GENERATE)
            return str(slow.value), str(gone.value)

    slow, gone = asyncio.run(run())
    assert "did not answer /generate_stream in time" in slow
    assert "refused the connection for /generate" in gone
    assert "127.0.0.1" not in slow + gone
    wait_for(lambda: running_requests(keyed) == 0, 5, "the engine to drop the cut stream")
