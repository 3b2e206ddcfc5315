"""The router as Serve's HTTP ingress: the router over Serve handles to the tiers and ledger."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette

from ..config import AppConfig
from ..metrics import MetricsRecorder
from ..serve_env import missing_protections
from . import usage_log
from .dispatch import ServeTransport
from .ledger import ServeLedger
from .routes import Router

logger = logging.getLogger("ray.serve")


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
        usage_log.to_stdout()
        missing = missing_protections(os.environ)
        self._router.missing_guards = sorted(missing)
        if missing:
            logger.warning(
                "this Ray cluster was started without the settings the local stack and the "
                "KubeRay manifests give every Ray process (serve_app/serve_env.py): HAProxy's "
                "client timeout, the header screen or the fast ingress may be missing. Set them "
                "in the environment of `ray start` on every node: %s",
                " ".join(f"{k}={v}" for k, v in missing.items()),
            )
        replica = serve.get_replica_context().replica_id.unique_id
        self._reporting = asyncio.create_task(self._router.report_queues(replica))

    def __serve_build_asgi_app__(self) -> Starlette:
        return self._router.asgi_app()
