"""The Serve config's `import_path`s: `build_router` and `build_tier`, the applications of a
rendered config (`serve_app.serve_config`), each tier and the router on its own; `build_app`,
every tier and the router as one application (the source form, redeployed whole on any change)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from .config import AppConfig, TierConfig, TracingConfig
from .router.deployment import RouterDeployment
from .router.ledger import LedgerDeployment
from .router.version_board import VersionBoardDeployment
from .serve_config import (
    ROUTER_DEPLOYMENT,
    request_router_config,
    scaling_options,
    tier_app_name,
)
from .tier.deployment import TierDeployment, TierEntry

# Ray's own resource of the head node (Ray places its state actors there the same way).
HEAD_NODE = "node:__internal_head__"


def tier_deployment(
    tier: TierConfig, routers: int = 1, scaling: dict[str, Any] | None = None
) -> Deployment:
    """A tier's Serve deployment; its Ray resources come from the same config as the engine's
    `--num-shard`, so the two cannot disagree. `scaling`: its replica options, when not the
    tier's own bounds."""
    bounds = tier.replicas
    if scaling is None and bounds.min == bounds.max:
        scaling = {"num_replicas": bounds.min}
    elif scaling is None:
        # The source form: the policy takes its rule as arguments.
        autoscaling = scaling_options(tier)["autoscaling_config"]
        policy = {**autoscaling["policy"], "policy_kwargs": tier.scaling.model_dump()}
        scaling = {"autoscaling_config": {**autoscaling, "policy": policy}}
    scaling = dict(scaling)
    if tier.routing is not None:
        scaling["request_router_config"] = request_router_config(tier, routers)
    return TierDeployment.options(
        name=tier_app_name(tier.name, tier.version),
        ray_actor_options={
            "num_cpus": tier.tuning.cpus_per_replica,
            "num_gpus": tier.gpus_per_replica,
            "resources": dict(tier.ray_resources),
            # Replicas report their engine's load every second, not every ten.
            "runtime_env": {
                "env_vars": {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
            },
        },
        max_ongoing_requests=tier.tuning.max_ongoing_requests,
        max_queued_requests=tier.tuning.max_queued_requests,
        health_check_period_s=5,
        health_check_timeout_s=10,
        # Serve lets in-flight requests finish before the replica's engine is stopped: the
        # longest request (a lease is held up to `request_timeout_s + lease_reuse_s`), then the
        # engine's own drain and the stop's margin, before Serve kills the replica.
        graceful_shutdown_timeout_s=tier.request_timeout_s
        + tier.tuning.lease_reuse_s
        + tier.engine.tuning.graceful_termination_timeout_s
        + 15,
        max_constructor_retry_count=tier.tuning.max_start_attempts,
        # The router logs every client request; a line per engine lease would only repeat it,
        # at a cost on every request.
        logging_config={"enable_access_log": False},
        **scaling,
    )


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` as an `AppConfig` (errors name the bad field) and bind the deployments."""
    config = AppConfig.model_validate(args)
    versioned = [t.name for t in config.tiers if t.candidate is not None]
    if versioned:
        raise ValueError(
            f"tiers {versioned}: a candidate version is an application of its own: deploy the "
            "rendered config (`python -m serve_app.serve_config`)"
        )
    tiers = {
        tier.name: tier_deployment(tier, config.router.replicas).bind(
            tier.for_replicas(), config.tracing
        )
        for tier in config.tiers
    }
    ledger = ledger_deployment() if config.router.api_keys is not None else None
    return router_deployment(config.router.replicas, config.router.ray_resources).bind(
        config.for_router(), tiers, ledger
    )


def ledger_deployment() -> Application:
    # One replica holds every key's quota windows; Serve restarts it when it dies and
    # replaces it on every redeploy. Its windows start empty again then. It runs on the
    # head node, the one node of a cluster that never scales to zero (a tier's GPU pod may).
    return LedgerDeployment.options(
        name="quota-ledger",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}},
        max_ongoing_requests=10_000,
        health_check_period_s=2,
        health_check_timeout_s=5,
    ).bind()


def router_deployment(replicas: int, resources: Mapping[str, float]) -> Deployment:
    return RouterDeployment.options(
        name=ROUTER_DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": 0, "resources": dict(resources)},
        max_ongoing_requests=1000,
    )


def build_tier(args: dict[str, Any]) -> Application:
    """A tier's own application (`serve_app.serve_config.tier_app`): `args` are the settings
    that shape its engine; its replica bounds and live settings come with the deployment's
    options in the config (`user_config`), which Serve applies without a restart."""
    tier = TierConfig.from_engine_settings(args["tier"])
    tracing = args.get("tracing")
    # Placeholder bounds: the config's own (`scaling_options`) replace them.
    scaling = scaling_options(tier)
    deployment = tier_deployment(tier, int(args.get("routers", 1)), scaling).bind(
        tier.for_replicas(),
        TracingConfig.model_validate(tracing) if tracing is not None else None,
    )
    if tier.routing is None:
        return deployment
    # Serve refuses a request router of its own on an application's top deployment under
    # HAProxy (which would bypass it), though nothing reaches a tier's application over HTTP:
    # a routed tier's application is topped by a stub that holds no engine.
    return TierEntry.options(
        name=f"{tier_app_name(tier.name, tier.version)}-entry",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1,
    ).bind(deployment)


def build_router(args: dict[str, Any]) -> Application:
    """The router's own application (`serve_app.serve_config.router_app`): it reaches each
    tier's application by name, and takes the whole configuration, live, as its deployment's
    `user_config` (`RouterDeployment.reconfigure`). `args` hold what a running router cannot
    change: whether it holds the quota ledger, where it runs, and tracing (in `args` only so
    that a change of it restarts the router)."""
    return router_deployment(1, args.get("ray_resources") or {}).bind(
        None, None, ledger_deployment() if args.get("ledger") else None, board_deployment()
    )


def board_deployment() -> Application:
    # One replica holds the candidates' rollbacks for every router replica
    # (`serve_app.router.version_board`), on the head node as the ledger.
    return VersionBoardDeployment.options(
        name="version-board",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}},
        max_ongoing_requests=1000,
        health_check_period_s=5,
    ).bind()
