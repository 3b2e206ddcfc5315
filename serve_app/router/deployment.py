"""The router as Serve's HTTP ingress: the router over Serve handles to the tiers and ledger."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from ..config import AppConfig, TierConfig
from ..metrics import MetricsRecorder, tier_state
from ..serve_config import tier_app_name
from ..serve_env import missing_protections
from ..tier.startup import RayKV
from . import usage_log
from .dispatch import ServeTransport
from .ledger import ServeLedger
from .routes import Router
from .tier_watch import ControllerDetails, TierWatch
from .version_board import share_rollbacks
from .versions import targets

logger = logging.getLogger("ray.serve")


class LateApp:
    """The ASGI app Serve takes when the replica is built, before the router exists: a router
    of its own application gets its configuration with the first `reconfigure`, which Serve
    makes before the replica takes any request. Lifespan events are answered here."""

    def __init__(self) -> None:
        self.app: Starlette | None = None
        self._handlers: list[tuple[Any, Any]] = []

    def serve(self, app: Starlette) -> None:
        for exc, handler in self._handlers:
            app.add_exception_handler(exc, handler)
        self.app = app

    def add_exception_handler(self, exc: Any, handler: Any) -> None:
        self._handlers.append((exc, handler))
        if self.app is not None:
            self.app.add_exception_handler(exc, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]  # startup or shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if self.app is None:
            raise RuntimeError("the router takes requests only once it is configured")
        await self.app(scope, receive, send)


@serve.deployment
@serve.ingress()
class RouterDeployment:
    async def __init__(
        self,
        config: AppConfig | None,
        tiers: Mapping[str, DeploymentHandle] | None,
        ledger: DeploymentHandle | None = None,
        board: DeploymentHandle | None = None,
    ) -> None:
        """`config` and `tiers`: every tier bound into one application with the router
        (`serve_app.app.build_app`). Both `None`: the router's own application, which reaches
        each tier's application by name and is configured by `reconfigure`."""
        self._by_name = tiers is None
        self._handles: dict[str, DeploymentHandle] = dict(tiers or {})
        self._ledger = ServeLedger(ledger) if ledger is not None else None
        self._router: Router | None = None
        self._transport: ServeTransport | None = None
        self._app = LateApp()
        self._reporting: asyncio.Task[None] | None = None
        self._board = board  # the version board: rollbacks shared with the other replicas
        self._sharing: asyncio.Task[None] | None = None
        self._watch: TierWatch | None = None
        self._watching: asyncio.Task[None] | None = None
        self._replica = serve.get_replica_context().replica_id.unique_id
        usage_log.to_stdout()
        missing = missing_protections(os.environ)
        self._missing_guards = sorted(missing)  # shown by /health
        if missing:
            logger.warning(
                "this Ray cluster was started without the settings the local stack and the "
                "KubeRay manifests give every Ray process (serve_app/serve_env.py): HAProxy's "
                "client timeout, the header screen or the fast ingress may be missing. Set them "
                "in the environment of `ray start` on every node: %s",
                " ".join(f"{k}={v}" for k, v in missing.items()),
            )
        if config is not None:
            self._configure(config)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The whole configuration (`serve_app.serve_config.router_app`), at start and on every
        change of it: applied to the requests that arrive from then on, without a restart."""
        self._configure(AppConfig.model_validate(user_config).for_router())

    def _configure(self, config: AppConfig) -> None:
        tiers = targets(config)  # every version of every tier
        handles = self._tier_handles(tiers)
        if self._router is None or self._transport is None:
            self._transport = ServeTransport(handles, tiers, keep_leases=config.tracing is None)
            self._router = Router(config, self._transport, MetricsRecorder(), self._ledger)
            self._router.missing_guards = self._missing_guards
            self._app.serve(self._router.asgi_app())
            # Every tier's state, read in the background (`serve_app.router.tier_watch`).
            self._watch = TierWatch(self._router.states, RayKV(), ControllerDetails(), tier_state)
            self._watch.tiers(tiers)
            self._watching = asyncio.create_task(self._watch.run())
        else:
            self._transport.update(handles, tiers)
            self._router.reconfigure(config)
            if self._watch is not None:
                self._watch.tiers(tiers)
            logger.info("router reconfigured: tiers %s", ", ".join(tiers))
        if self._reporting is not None:
            self._reporting.cancel()
        self._reporting = asyncio.create_task(self._router.report_queues(self._replica))
        if self._board is not None and self._sharing is None:
            router = self._router
            self._sharing = asyncio.create_task(
                share_rollbacks(self._board, lambda: router.services.versions, router.rolled_back)
            )

    def _tier_handles(self, tiers: Mapping[str, TierConfig]) -> dict[str, DeploymentHandle]:
        """Each version's handle under its transport key (`serve_app.router.versions.targets`):
        a tier's application, or a version's, and its deployment share its name."""
        if not self._by_name:
            return {name: self._handles[name] for name in tiers}
        handles = {}
        for key, tier in tiers.items():
            app = tier_app_name(tier.name, tier.version)
            if app not in self._handles:
                # Not looked up now: a tier's application may deploy after the router's
                # (a blocking check would also stall this replica's loop). A call waits
                # for the tier's replicas, within its `replica_wait_timeout_s`.
                self._handles[app] = serve.get_deployment_handle(app, app, _check_exists=False)
            handles[key] = self._handles[app]
        return handles

    def __serve_build_asgi_app__(self) -> LateApp:
        return self._app
