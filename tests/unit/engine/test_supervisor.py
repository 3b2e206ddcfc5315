"""An engine's start-up that fails: the engine is stopped and the error says why.

The engine here is a real process on `PATH` under TGI's launcher name: a small HTTP server
whose `/health` answers 200 and whose `/info` fails, which neither TGI nor the local engine
can be made to do on purpose."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from serve_app.config import EngineConfig, EngineTuning, TierConfig
from serve_app.engine.supervisor import EngineStartupError, EngineSupervisor

BROKEN_INFO = textwrap.dedent(
    """\
    #!{python}
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 500)
            self.end_headers()
            self.wfile.write(b"{{}}" if self.path == "/health" else b"info is broken")

    argv = sys.argv
    port = int(argv[argv.index("--port") + 1])
    print("serving on", port, flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def tier() -> TierConfig:
    engine = EngineConfig(
        launcher="tgi", model_id="some/model", tuning=EngineTuning(startup_timeout_s=30)
    )
    return TierConfig(name="large", engine=engine, gpus_per_replica=1)


def supervisor(path: str) -> EngineSupervisor:
    logger = logging.LoggerAdapter(logging.getLogger("test_supervisor"), {})
    return EngineSupervisor(tier(), ["0"], {"PATH": path}, logger)


def test_an_engine_that_fails_its_info_check_is_stopped(tmp_path: Path) -> None:
    launcher = tmp_path / "text-generation-launcher"
    launcher.write_text(BROKEN_INFO.format(python=sys.executable))
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    engine = supervisor(f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(EngineStartupError, match=r"failed to start: .*500") as failed:
        asyncio.run(engine.start())
    assert "serving on" in str(failed.value)  # the engine's last output
    assert engine.process.returncode is not None  # stopped, not left running
    assert not engine.process.alive()


def test_a_launcher_that_is_not_installed_is_a_startup_error(tmp_path: Path) -> None:
    engine = supervisor(str(tmp_path))
    spawned: list[bool] = []
    with pytest.raises(EngineStartupError, match="text-generation-launcher"):
        asyncio.run(engine.start(on_spawned=lambda: spawned.append(True)))
    assert spawned == []  # never ran: never loading


# vLLM's server as far as readiness goes: `/health`, and `/v1/models` naming what it serves.
VLLM_LIKE = textwrap.dedent(
    """\
    #!{python}
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    SERVED = {served!r}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {{"/health": b"", "/v1/models": json.dumps(
                {{"object": "list", "data": [{{"id": SERVED, "object": "model"}}]}}).encode()}}
            self.send_response(200 if self.path in body else 404)
            self.end_headers()
            self.wfile.write(body.get(self.path, b"{{}}"))

    argv = sys.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], argv
    port = int(argv[argv.index("--port") + 1])
    print("serving", SERVED, flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)


def vllm_supervisor(tmp_path: Path, served: str) -> EngineSupervisor:
    python = tmp_path / "python"
    python.write_text(VLLM_LIKE.format(python=sys.executable, served=served))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    engine = EngineConfig(
        launcher="vllm",
        model_id="/models/smollm2",
        tuning=EngineTuning(python=str(python), startup_timeout_s=30),
    )
    tier = TierConfig(name="v", engine=engine)
    logger = logging.LoggerAdapter(logging.getLogger("test_supervisor"), {})
    return EngineSupervisor(tier, [], {"PATH": os.environ["PATH"]}, logger)


def test_a_vllm_engine_is_ready_when_its_models_name_the_tiers(tmp_path: Path) -> None:
    engine = vllm_supervisor(tmp_path, "/models/smollm2")
    spawned: list[bool] = []

    async def start_and_stop() -> None:
        # told once the process runs, before it is ready (the replica's `loading` phase)
        await engine.start(on_spawned=lambda: spawned.append(engine.process.alive()))
        try:
            await engine.check()
        finally:
            await engine.stop()

    asyncio.run(start_and_stop())
    assert spawned == [True]
    assert not engine.process.alive()


def test_a_vllm_engine_serving_another_model_is_stopped(tmp_path: Path) -> None:
    engine = vllm_supervisor(tmp_path, "/models/other")
    with pytest.raises(EngineStartupError, match=r"serves models \['/models/other'\], not"):
        asyncio.run(engine.start())
    assert not engine.process.alive()
