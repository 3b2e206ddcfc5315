"""The router as Serve's HTTP ingress: the router over Serve handles to the tiers and ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette

from ..config import AppConfig
from ..metrics import MetricsRecorder
from .dispatch import ServeTransport
from .ledger import ServeLedger
from .routes import Router


@serve.deployment
@serve.ingress()
class RouterDeployment:
    async def __init__(
        self,
        config: AppConfig,
        tiers: Mapping[str, DeploymentHandle],
        ledger: DeploymentHandle | None = None,
    ) -> None:
        self._router = Router(
            config,
            ServeTransport(
                tiers,
                {tier.name: tier for tier in config.tiers},
                keep_leases=config.tracing is None,
            ),
            MetricsRecorder(),
            ServeLedger(ledger) if ledger is not None else None,
        )
        replica = serve.get_replica_context().replica_id.unique_id
        self._reporting = asyncio.create_task(self._router.report_queues(replica))

    def __serve_build_asgi_app__(self) -> Starlette:
        return self._router.asgi_app()
