"""`build_app`: the Serve config's `import_path`, turning `args` into the application."""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from .config import AppConfig, TierConfig
from .router.deployment import RouterDeployment
from .router.ledger import LedgerDeployment
from .tier.deployment import TierDeployment

# Ray's own resource of the head node (Ray places its state actors there the same way).
HEAD_NODE = "node:__internal_head__"


def tier_deployment(tier: TierConfig, routers: int = 1) -> Deployment:
    """A tier's Serve deployment; its Ray resources come from the same config as the engine's
    `--num-shard`, so the two cannot disagree."""
    bounds = tier.replicas
    scaling: dict[str, Any] = (
        {"num_replicas": bounds.min}
        if bounds.min == bounds.max
        else {
            "autoscaling_config": {
                "min_replicas": bounds.min,
                "max_replicas": bounds.max,
                "initial_replicas": bounds.min,
                # Delays, steps and hysteresis are the policy's own; Serve adds none.
                "upscale_delay_s": 0,
                "downscale_delay_s": 0,
                # Load reaches the controller every second, not every ten. Ray 2.60 still reads
                # the push interval from this (deprecated) field.
                "metrics_interval_s": 1,
                "look_back_period_s": 2,
                "policy": {
                    "policy_function": "serve_app.autoscaling:QueueLengthPolicy",
                    "policy_kwargs": tier.scaling.model_dump(),
                },
            }
        }
    )
    if tier.routing is not None:
        # Replica choice by engine state (`serve_app.tier.request_router`).
        scaling["request_router_config"] = {
            "request_router_class": "serve_app.tier.request_router:EngineAwareRouter",
            "request_router_kwargs": {"routing": tier.routing.model_dump(), "routers": routers},
            "request_routing_stats_period_s": tier.routing.tuning.stats_period_s,
            "request_routing_stats_timeout_s": 5,
        }
    return TierDeployment.options(
        name=f"tier-{tier.name}",
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
    tiers = {
        tier.name: tier_deployment(tier, config.router.replicas).bind(
            tier.for_replicas(), config.tracing
        )
        for tier in config.tiers
    }
    ledger = None
    if config.router.api_keys is not None:
        # One replica holds every key's quota windows; Serve restarts it when it dies and
        # replaces it on every redeploy. Its windows start empty again then. It runs on the
        # head node, the one node of a cluster that never scales to zero (a tier's GPU pod may).
        ledger = LedgerDeployment.options(
            name="quota-ledger",
            num_replicas=1,
            ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}},
            max_ongoing_requests=10_000,
            health_check_period_s=2,
            health_check_timeout_s=5,
        ).bind()
    return RouterDeployment.options(
        name="router",
        num_replicas=config.router.replicas,
        ray_actor_options={"num_cpus": 0, "resources": dict(config.router.ray_resources)},
        max_ongoing_requests=1000,
    ).bind(config.for_router(), tiers, ledger)
