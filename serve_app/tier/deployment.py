"""The tier deployment: each replica supervises one engine on the GPUs Ray gave it."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from ..config import TierConfig
from ..engine.client import EngineReply
from ..engine.supervisor import EngineSupervisor

logger = logging.getLogger("ray.serve")


class ReplicaLog(logging.LoggerAdapter):
    """Prefixes every engine line with the tier and replica it belongs to."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[tier={self.extra['tier']} replica={self.extra['replica']}] {msg}", kwargs


@serve.deployment
class TierDeployment:
    """Forwards requests for one tier to this replica's engine, and lives and dies with it."""

    async def __init__(self, tier: TierConfig) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        log = ReplicaLog(logger, {"tier": tier.name, "replica": replica})
        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        self._supervisor = EngineSupervisor(tier, gpu_ids, os.environ, log)
        await self._supervisor.start()

    async def request(self, path: str, payload: dict[str, Any]) -> EngineReply:
        return await self._supervisor.client.post(path, payload)

    async def stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator[str]:
        async for data in self._supervisor.client.stream(path, payload):
            yield data

    async def info(self) -> dict[str, Any]:
        return await self._supervisor.client.info()

    async def check_health(self) -> None:
        await self._supervisor.check()

    async def __del__(self) -> None:
        await self._supervisor.stop()
