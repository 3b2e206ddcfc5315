"""The configuration model: the shipped config is valid, and bad ones name the bad field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.build_app import build_app as flatten

from serve_app.app import build_app
from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]


def local_args() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    return copy.deepcopy(config["applications"][0]["args"])


def test_shipped_config_is_valid() -> None:
    config = AppConfig.model_validate(local_args())
    assert [t.name for t in config.tiers] == ["small", "large"]
    assert config.default_tier == "small"
    assert config.tier("large").model_names == ("large", "gpt-4o")


def _set(args: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = args
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value


INVALID = [
    # (field path to change, new value, text the error must contain)
    ("tiers", [], "tiers"),
    ("tiers.0.name", "Small_Tier", "tiers.0"),
    ("tiers.0.gpus_per_replica", -1, "tiers.0.gpus_per_replica"),
    ("tiers.0.engine.max_total_tokens", 0, "tiers.0.engine.max_total_tokens"),
    ("tiers.0.engine.max_input_tokens", 4096, "max_input_tokens (4096) must be less than"),
    ("tiers.0.engine.launcher", "vllm", "tiers.0.engine.launcher"),
    ("tiers.0.engine.model_id", "", "tiers.0.engine.model_id"),
    ("tiers.0.engine.dtype", "float8", "tiers.0.engine.dtype"),
    ("tiers.0.max_tokens_limit", 100_000, "max_tokens_limit (100000) must be below"),
    ("tiers.0.default_max_tokens", 600, "default_max_tokens (600) exceeds"),
    ("tiers.1.replicas.min", 3, "min (3) must not exceed max (1)"),
    ("tiers.0.replicas.max", 0, "tiers.0.replicas.max"),
    ("tiers.0.engine.startup_timeout_s", -5, "tiers.0.engine.startup_timeout_s"),
    ("tiers.0.request_timeout_s", "soon", "tiers.0.request_timeout_s"),
    ("tiers.1.aliases", ["gpt-4o-mini"], "'gpt-4o-mini' is used by tiers 'small' and 'large'"),
    ("tiers.1.name", "small", "'small' is used by tiers"),
    ("router.default_tier", "medium", "router.default_tier 'medium' is not one of the tiers"),
    ("router.max_body_bytes", 0, "router.max_body_bytes"),
    ("tiers.0.max_token_limit", 10, "tiers.0.max_token_limit"),  # a typo: unknown field
    ("routers", {}, "routers"),
    ("tiers.0.engine.launcher", "tgi", "threads applies to the local engine only"),
    ("tiers.0.engine", {"launcher": "tgi"}, "a 'tgi' engine needs gpus_per_replica >= 1"),
    ("tiers.0.overflow_tier", "small", "overflow_tier 'small' must be another tier"),
    ("tiers.0.overflow_tier", "medium", "overflow_tier 'medium' must be another tier"),
    ("router.auto_rules", [{"tier": "medium", "min_max_tokens": 5}], "auto_rules[0].tier 'medium'"),
    ("router.auto_rules", [{"tier": "large"}], "a rule needs min_prompt_chars"),
    ("tiers.1.aliases", ["auto"], "'auto' is reserved"),
    ("router.api_keys", {"file": "/k", "reload_interval_s": 61}, "api_keys.reload_interval_s"),
    ("router.api_keys", {"file": "/k", "reload_interval_s": 0}, "api_keys.reload_interval_s"),
    ("router.ray_resources", {"serve_app_router": "one"}, "router.ray_resources"),
    ("tiers.0.engine.graceful_termination_timeout_s", 0.5, "graceful_termination_timeout_s"),
    ("tiers.0.engine.quantize", "fp-8", "tiers.0.engine.quantize"),
]


@pytest.mark.parametrize(("path", "value", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_config_names_the_field(path: str, value: Any, message: str) -> None:
    args = local_args()
    _set(args, path, value)
    with pytest.raises(ValidationError) as info:
        build_app(args)
    assert message in str(info.value)


def test_the_router_is_pinned_by_its_ray_resources() -> None:
    args = local_args()
    _set(args, "router.ray_resources", {"serve_app_router": 1})
    options = build_app(args)._bound_deployment.ray_actor_options
    assert options["resources"] == {"serve_app_router": 1}
    assert options["num_cpus"] == 0


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"fallback_tier": "medium"}, "router.fallback_tier 'medium' is not one of the tiers"),
        ({"api_keys": {"on_ledger_failure": "maybe"}}, "router.api_keys.on_ledger_failure"),
        ({"max_messages": 0}, "router.max_messages"),
    ],
)
def test_router_settings_are_checked(router: dict[str, Any], message: str) -> None:
    args = local_args()
    args["router"].update(router)
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        AppConfig.model_validate(args)


def test_keys_on_add_the_quota_ledger_to_the_application() -> None:
    args = local_args()
    assert "quota-ledger" not in _deployments(build_app(args))
    args["router"]["api_keys"] = {"env": "KEYS", "lease_fraction": 0.1}  # old field still taken
    assert "quota-ledger" in _deployments(build_app(args))


def _deployments(app: Any) -> set[str]:
    return {d.name for d in flatten(app, name="llm").deployments}


def test_a_spare_lease_is_kept_only_for_tiers_that_keep_leases_and_never_scale_to_zero() -> None:
    """As the router replicas see the tier: built from `for_router`, without `replicas`."""

    def tier(**changes: Any) -> Any:
        args = local_args()
        args["tiers"][0].update(changes)
        return AppConfig.model_validate(args).for_router().tiers[0]

    assert tier(replicas={"min": 1, "max": 2}).keeps_spare_lease
    assert not tier(replicas={"min": 0, "max": 2}).keeps_spare_lease  # a renewal would wake it
    assert not tier(lease_spare_s=0).keeps_spare_lease
    assert not tier(lease_reuse_s=0).keeps_spare_lease
    assert not tier(data_path="relay").keeps_spare_lease
    # scaling between counts of one or more replicas leaves the routers' config alone
    assert tier(replicas={"min": 1, "max": 2}) == tier(replicas={"min": 3, "max": 5})


def test_a_tier_replica_may_drain_its_longest_request_before_serve_stops_it() -> None:
    from serve_app.app import tier_deployment

    tier = AppConfig.model_validate(local_args()).tier("small")
    options = tier_deployment(tier)._deployment_config
    drain = tier.request_timeout_s + tier.lease_reuse_s + tier.engine.graceful_termination_timeout_s
    assert options.graceful_shutdown_timeout_s > drain
