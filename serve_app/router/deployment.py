"""The router as Serve's HTTP ingress."""

from __future__ import annotations

from collections.abc import Mapping

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette

from ..config import AppConfig
from .app import Router


@serve.deployment
@serve.ingress()
class RouterDeployment:
    def __init__(self, config: AppConfig, tiers: Mapping[str, DeploymentHandle]) -> None:
        self._router = Router(config, tiers)

    def __serve_build_asgi_app__(self) -> Starlette:
        return self._router.asgi_app()
