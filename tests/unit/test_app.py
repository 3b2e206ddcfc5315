"""The Serve application built from a config: where the router runs, which deployments it
holds, how long a tier replica may drain."""

from __future__ import annotations

from typing import Any

from ray.serve._private.build_app import build_app as flatten

from serve_app.app import build_app, tier_deployment
from serve_app.config import AppConfig

from .shipped_config import local_args, set_path


def test_the_router_is_pinned_by_its_ray_resources() -> None:
    args = local_args()
    set_path(args, "router.ray_resources", {"serve_app_router": 1})
    options = build_app(args)._bound_deployment.ray_actor_options
    assert options["resources"] == {"serve_app_router": 1}
    assert options["num_cpus"] == 0


def test_keys_on_add_the_quota_ledger_to_the_application() -> None:
    args = local_args()
    assert "quota-ledger" not in _deployments(build_app(args))
    args["router"]["api_keys"] = {"env": "KEYS"}
    assert "quota-ledger" in _deployments(build_app(args))


def test_the_quota_ledger_runs_on_the_head_node() -> None:
    """Never on a tier's node, which may scale to zero and take every key's windows with it."""
    args = local_args()
    args["router"]["api_keys"] = {"env": "KEYS"}
    ledger = next(d for d in flatten(build_app(args), name="llm").deployments
                  if d.name == "quota-ledger")  # fmt: skip
    assert ledger.ray_actor_options["resources"] == {"node:__internal_head__": 0.001}
    assert ledger.ray_actor_options["num_cpus"] == 0  # a head that takes no work still has room


def _deployments(app: Any) -> set[str]:
    return {d.name for d in flatten(app, name="llm").deployments}


def test_a_tier_replica_may_drain_its_longest_request_before_serve_stops_it() -> None:
    tier = AppConfig.model_validate(local_args()).tier("small")
    options = tier_deployment(tier)._deployment_config
    drain = (
        tier.request_timeout_s
        + tier.tuning.lease_reuse_s
        + tier.engine.tuning.graceful_termination_timeout_s
    )
    assert options.graceful_shutdown_timeout_s > drain
