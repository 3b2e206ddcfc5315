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
    with pytest.raises(EngineStartupError, match="text-generation-launcher"):
        asyncio.run(engine.start())
