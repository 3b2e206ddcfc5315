"""A request's path through the router: each module it passes is entered from above, never
climbed back into from a module it called (the order is listed in docs/architecture.md)."""

from __future__ import annotations

import asyncio
import sys
from types import FrameType
from typing import Any

from .router_kit import CHAT, call, config, engine, router


def _module(frame: FrameType | None) -> str | None:
    name = frame.f_globals.get("__name__", "") if frame is not None else ""
    return name if name.startswith("serve_app.") else None


def traced(path: str, body: dict[str, Any], tmp: Any) -> tuple[list[str], list[str], set[str]]:
    """The project's modules in order of first entry, the climbs back (a call into a module
    that is on the stack below its caller), and the functions run."""
    r, _, _ = router(config(tmp), engine)
    app = r.asgi_app()
    order: list[str] = []
    climbs: list[str] = []
    functions: set[str] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        module = _module(frame)
        if event != "call" or module is None:
            return
        functions.add(f"{module}.{frame.f_code.co_qualname}")
        if module not in order:
            order.append(module)
        below = [m for f in _stack(frame.f_back) if (m := _module(f)) is not None]
        if below and below[0] != module and module in below[1:]:
            climbs.append(f"{below[0]} -> {module}.{frame.f_code.co_qualname}")

    async def run() -> int:
        sys.setprofile(profile)
        try:
            answer = await call(
                app, "POST", path, body, {"authorization": "Bearer sk-team-a-0123456789abcdef"}
            )
        finally:
            sys.setprofile(None)
        return answer.status

    assert asyncio.run(run()) == 200
    return order, climbs, functions


def _stack(frame: FrameType | None) -> list[FrameType]:
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def test_a_streamed_chat_never_climbs_back_into_a_module(tmp_path: Any) -> None:
    order, climbs, functions = traced("/v1/chat/completions", {**CHAT, "stream": True}, tmp_path)
    assert climbs == []
    router_modules = [m for m in order if m.startswith("serve_app.router.")]
    assert router_modules[:2] == ["serve_app.router.routes", "serve_app.router.lifecycle"]
    print(f"{len(order)} modules, {len(functions)} functions:", *order, sep="\n  ")


def test_a_tgi_stream_never_climbs_back_into_a_module(tmp_path: Any) -> None:
    body = {"inputs": "What is the capital of France?", "parameters": {"max_new_tokens": 4}}
    _, climbs, _ = traced("/generate_stream", body, tmp_path)
    assert climbs == []
