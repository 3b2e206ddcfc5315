"""An engine's life: start it, decide when it is ready, watch it, stop it in order."""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..config import TierConfig, TracingConfig
from ..errors import EngineStartupError, EngineUnavailable
from .client import EngineClient
from .launcher import Ports, build_launch, shard_uds_path, with_hf_token
from .process import EngineProcess

READY_POLL_S = 0.25


class EngineState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel just handed out on `host`, held together so that they differ."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class EngineSupervisor:
    def __init__(
        self,
        tier: TierConfig,
        gpu_ids: Sequence[str],
        environ: Mapping[str, str],
        logger: logging.LoggerAdapter,
        tracing: TracingConfig | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """`host` is where the engine listens: loopback, or the node's address when routers
        stream from the engine themselves. Either way the engine's generating routes take
        only this supervisor's own key (`api_key`), made afresh for every engine."""
        self._tier = tier
        self._log = logger
        self._workdir = Path(tempfile.mkdtemp(prefix=f"engine-{tier.name}-"))
        http, prometheus, master = free_ports(3, host)
        ports = Ports(http, prometheus, master, shard_uds_path(self._workdir), host)
        self.api_key = secrets.token_urlsafe(32)
        self.url = f"http://{_url_host(host)}:{http}"
        environ = with_hf_token(environ)
        self.spec = build_launch(tier, ports, gpu_ids, environ, tracing, self.api_key)
        self.process = EngineProcess(self.spec, logger)
        self.client = EngineClient(self.url, tier.request_timeout_s, api_key=self.api_key)
        self.state = EngineState.STARTING

    async def start(self, on_spawned: Callable[[], None] | None = None) -> None:
        """Start the engine and return once it serves the configured model; `on_spawned` is
        called once its process runs (it then loads the model).

        Ready means: the process is alive, `/health` answers 200 and `/info` (vLLM:
        `/v1/models`) names the model.
        An engine that exits, runs past the start-up timeout or fails the checks raises
        `EngineStartupError` with its exit code and last log lines, which Serve shows as the
        replica's failure; the engine is stopped first, however start-up ends.
        """
        try:
            await self._start(on_spawned)
        except EngineStartupError:
            await self.stop()
            raise
        except Exception as exc:
            await self.stop()
            raise EngineStartupError(
                f"engine for tier {self._tier.name!r} failed to start: {exc}. "
                f"Last output:\n{self._tail()}"
            ) from exc
        except BaseException:  # cancelled: the replica is going away
            await self.stop()
            raise

    async def _start(self, on_spawned: Callable[[], None] | None) -> None:
        await self.process.start()
        if on_spawned is not None:
            on_spawned()
        timeout = self._tier.engine.tuning.startup_timeout_s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                code = await self.process.wait()
                raise EngineStartupError(
                    f"engine for tier {self._tier.name!r} exited with code {code} during "
                    f"start-up. Last output:\n{self._tail()}"
                )
            if await self.client.healthy():
                await self._serves_the_model()
                self.state = EngineState.READY
                self._log.info("engine ready (pid %s)", self.process.pid)
                return
            await asyncio.sleep(READY_POLL_S)
        raise EngineStartupError(
            f"engine for tier {self._tier.name!r} was not ready within {timeout:.0f}s "
            f"(engine.tuning.startup_timeout_s). Last output:\n{self._tail()}"
        )

    async def _serves_the_model(self) -> None:
        """TGI's engines name their model in `/info`; vLLM lists its served names in
        `/v1/models` (it has no `/info`)."""
        wanted = self._tier.engine.model_id
        if self._tier.engine.protocol == "openai":
            served = await self.client.model_ids()
            if wanted not in served:
                raise EngineStartupError(f"engine serves models {served!r}, not {wanted!r}")
            return
        model_id = (await self.client.info()).get("model_id")
        if model_id != wanted:
            raise EngineStartupError(f"engine serves model {model_id!r}, not {wanted!r}")

    async def ended(self) -> int | None:
        """Wait for the engine to exit: its exit code if it ended on its own while serving,
        None if it was stopped (`stop`)."""
        code = await self.process.wait()
        return code if self.state is EngineState.READY else None

    async def check(self) -> None:
        """Raise unless the engine process is alive and answers its health check."""
        if not self.process.alive():
            raise EngineUnavailable(
                f"engine exited with code {self.process.returncode}. Last output:\n{self._tail()}"
            )
        if not await self.client.healthy():
            raise EngineUnavailable("engine /health is not 200")

    async def stop(self) -> None:
        if self.state is EngineState.STOPPED:
            return
        self.state = EngineState.STOPPING
        # TGI drains for up to its graceful timeout after SIGTERM, vLLM ends its requests and
        # exits; allow that plus a margin.
        await self.process.terminate(self._tier.engine.tuning.graceful_termination_timeout_s + 5)
        await self.client.aclose()
        shutil.rmtree(self._workdir, ignore_errors=True)
        self.state = EngineState.STOPPED

    def _tail(self) -> str:
        return "\n".join(self.process.tail) or "(no output)"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
