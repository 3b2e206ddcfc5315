"""The rendered Serve config: one application per tier and one for the router, the committed
configs in sync with their sources, and which changes reach which application's code version
(what Serve redeploys, restarting its replicas)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve._private.build_app import build_app as flatten
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app.app import build_router, build_tier
from serve_app.config import TIER_LIVE, AppConfig, TierConfig, engine_settings
from serve_app.serve_config import render, render_file, source_config

from .shipped_config import ROOT, local_args, set_path

SOURCES = {
    "configs/local.yaml": "configs/src/local.yaml",
    "configs/gpu.yaml": "configs/src/gpu.yaml",
}


def source(args: dict[str, Any]) -> dict[str, Any]:
    return {"applications": [{"name": "llm", "route_prefix": "/",
                              "import_path": "serve_app.app:build_app", "args": args}]}  # fmt: skip


def versions(args: dict[str, Any]) -> dict[str, str]:
    """Each application's code version, as Serve computes it: what a redeploy restarts."""
    return {
        app["name"]: get_app_code_version(ServeApplicationSchema.model_validate(app))
        for app in render(source(args))["applications"]
    }


@pytest.mark.parametrize("target", sorted(SOURCES))
def test_committed_configs_are_what_their_sources_render(target: str) -> None:
    committed = (ROOT / target).read_text()
    assert committed == render_file(Path(SOURCES[target]), Path(target)), (
        f"{target} is stale: run `make configs`"
    )


@pytest.mark.parametrize("target", sorted(SOURCES))
def test_the_committed_configs_are_serve_configs_of_one_application_per_tier(target: str) -> None:
    document = yaml.safe_load((ROOT / target).read_text())
    ServeDeploySchema.model_validate(document)
    config = source_config(document)
    names = [app["name"] for app in document["applications"]]
    assert names == ["llm", *(f"tier-{t.name}" for t in config.tiers)]
    routes = [app["route_prefix"] for app in document["applications"]]
    assert routes == ["/", *([None] * len(config.tiers))]  # only the router takes HTTP
    assert render(document) == document  # rendering again changes nothing
    src = yaml.safe_load((ROOT / SOURCES[target]).read_text())
    assert config == AppConfig.model_validate(src["applications"][0]["args"])


LIVE_CHANGES = [
    ("tiers.1.default_max_tokens", 64),
    ("tiers.1.max_tokens_limit", 300),
    ("tiers.0.aliases", ["tiny"]),
    ("tiers.0.overflow_tier", None),
    ("tiers.0.replica_wait_timeout_s", 30),
    ("tiers.0.replicas", {"min": 1, "max": 4}),
    ("tiers.1.replicas", {"min": 0, "max": 3}),  # fixed to scaling, down to zero
    ("tiers.0.scaling.target_per_replica", 2),
    ("tiers.0.admission", {"max_in_flight": 8}),
    ("tiers.0.tuning.overflow_at_in_flight", 4),
    ("tiers.0.tuning.gpu_hour_price_usd", 2.5),
    ("tiers.0.tuning.require_max_tokens", True),
    ("router.default_tier", "large"),
    ("router.auto_rules", []),
    ("router.replicas", 3),
    ("router.tuning.max_body_bytes", 100_000),
    ("router.api_keys.file", "/elsewhere/keys.yaml"),
    ("router.api_keys.on_ledger_failure", "allow"),
]


@pytest.mark.parametrize(("path", "value"), LIVE_CHANGES)
def test_a_live_setting_changes_no_applications_code_version(path: str, value: Any) -> None:
    args = local_args()
    args["router"]["api_keys"] = {"file": "/keys/keys.yaml"}
    changed = copy.deepcopy(args)
    set_path(changed, path, value)
    AppConfig.model_validate(changed)
    assert versions(changed) == versions(args)
    # ... and reaches the running replicas through their deployments' options
    assert render(source(changed)) != render(source(args))


ENGINE_CHANGES = [
    ("tiers.0.engine.tuning.max_concurrent_requests", 48),
    ("tiers.0.engine.model_id", "another-model"),
    ("tiers.0.engine.extra_args", ["--flag"]),
    ("tiers.0.tuning.max_ongoing_requests", 8),
    ("tiers.0.tuning.data_path", "relay"),
    ("tiers.0.request_timeout_s", 60),
]


@pytest.mark.parametrize(("path", "value"), ENGINE_CHANGES)
def test_an_engine_setting_restarts_its_tier_only(path: str, value: Any) -> None:
    args = local_args()
    changed = copy.deepcopy(args)
    set_path(changed, path, value)
    before, after = versions(args), versions(changed)
    assert {name for name in before if before[name] != after[name]} == {"tier-small"}


def test_tracing_and_keys_on_or_off_restart_the_router() -> None:
    args = local_args()
    keys = copy.deepcopy(args)
    keys["router"]["api_keys"] = {"env": "KEYS"}
    assert versions(keys)["llm"] != versions(args)["llm"]
    traced = copy.deepcopy(args)
    traced["tracing"] = {"otlp_endpoint": "http://collector:4317"}
    assert all(versions(traced)[name] != versions(args)[name] for name in versions(args))


def test_a_tiers_engine_settings_hold_no_live_setting_and_come_back_whole() -> None:
    config = AppConfig.model_validate(local_args())
    for tier in config.tiers:
        settings = engine_settings(tier)
        built = TierConfig.from_engine_settings(settings)
        assert built.engine == tier.engine and built.name == tier.name
        assert built.tuning.data_path == tier.tuning.data_path
        assert built.for_replicas().engine == tier.for_replicas().engine
        assert not {path.split(".")[0] for path in TIER_LIVE} & set(settings) - {"tuning"}
    with pytest.raises(ValueError, match="only settings that shape its engine"):
        TierConfig.from_engine_settings({"name": "small", "default_max_tokens": 8})


def test_the_applications_build_as_serve_builds_them() -> None:
    args = local_args()
    set_path(args, "tiers.0.ray_resources", {"tier_small": 1})
    args["router"]["api_keys"] = {"env": "KEYS"}
    router, small, _ = render(source(args))["applications"]
    built = flatten(build_router(router["args"]), name="llm").deployments
    assert {d.name for d in built} == {"router", "quota-ledger", "version-board"}
    (tier,) = flatten(build_tier(small["args"]), name="tier-small").deployments
    assert tier.name == "tier-small"
    assert tier.ray_actor_options["resources"] == {"tier_small": 1}
    # a fixed tier scales too, within equal bounds, so that its bounds change live
    bounds = small["deployments"][0]["autoscaling_config"]
    assert (bounds["min_replicas"], bounds["max_replicas"]) == (1, 2)
    assert "policy_kwargs" not in bounds["policy"]  # the rule comes from the replicas
    assert small["deployments"][0]["user_config"]["scaling"]["downscale_delay_s"] == 30


def test_a_routed_tier_is_held_by_a_stub_that_serve_lets_top_its_application() -> None:
    """Serve refuses a custom request router on an application's top deployment under HAProxy
    (set in code or in the config's options): a routed tier's application is topped by a stub."""
    args = local_args()
    set_path(args, "tiers.0.routing", {"prefix_affinity": True})
    document = render(source(args))
    ServeDeploySchema.model_validate(document)
    small = document["applications"][1]
    assert small["args"]["routers"] == 1
    built = flatten(build_tier(small["args"]), name="tier-small")
    assert built.ingress_deployment_name == "tier-small-entry"
    tier = next(d for d in built.deployments if d.name == "tier-small")
    options = tier._deployment_config.request_router_config
    assert options.request_router_class == "serve_app.tier.request_router:EngineAwareRouter"
    more_routers = copy.deepcopy(args)
    more_routers["router"]["replicas"] = 2
    changed = {n for n, v in versions(more_routers).items() if versions(args)[n] != v}
    assert changed == {"tier-small"}  # its request router's share of each router changed


# -- versions: a candidate is an application of its own; promoting it restarts nothing --------


def with_candidate(engine: dict[str, Any] | None = None, **candidate: Any) -> dict[str, Any]:
    args = local_args()
    args["tiers"][0]["version"] = "v1"
    args["tiers"][0]["candidate"] = {"version": "v2", **candidate}
    if engine is not None:
        args["tiers"][0]["candidate"]["engine"] = engine
    return args


def promoted(args: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(args)
    tier = out["tiers"][0]
    candidate = tier.pop("candidate")
    tier["version"] = candidate["version"]
    if "engine" in candidate:
        tier["engine"] = candidate["engine"]
    return out


def test_a_candidate_renders_as_an_application_of_its_own() -> None:
    engine = {**local_args()["tiers"][0]["engine"], "max_total_tokens": 4096}
    args = with_candidate(engine, weight_percent=10, replicas={"min": 1, "max": 3})
    document = render(source(args))
    ServeDeploySchema.model_validate(document)
    apps = {app["name"]: app for app in document["applications"]}
    assert "tier-small@v1" in apps and "tier-small@v2" in apps and "tier-small" not in apps
    candidate = apps["tier-small@v2"]
    assert candidate["args"]["tier"]["engine"]["max_total_tokens"] == 4096
    assert candidate["args"]["tier"]["version"] == "v2" and "candidate" not in candidate["args"]
    (deployment,) = candidate["deployments"]
    assert deployment["name"] == "tier-small@v2"
    assert deployment["autoscaling_config"]["max_replicas"] == 3
    (tier,) = flatten(build_tier(candidate["args"]), name="tier-small@v2").deployments
    assert tier.name == "tier-small@v2"
    assert render(document) == document


@pytest.mark.parametrize("engine", [None, {"model_id": "simulated", "max_total_tokens": 2048}])
def test_promoting_a_candidate_restarts_neither_version(engine: dict[str, Any] | None) -> None:
    args = with_candidate(engine, weight_percent=100)
    before, after = versions(args), versions(promoted(args))
    assert after["tier-small@v2"] == before["tier-small@v2"]  # the promoted one: unchanged
    assert "tier-small@v1" not in after  # the former stable one: deleted by Serve
    assert after["tier-large"] == before["tier-large"]


def test_changing_the_candidates_weight_restarts_no_application() -> None:
    assert versions(with_candidate(weight_percent=10)) == versions(
        with_candidate(weight_percent=50, shadow_percent=100)
    )


def test_adding_or_removing_a_candidate_leaves_the_stable_version_running() -> None:
    stable = local_args()
    stable["tiers"][0]["version"] = "v1"
    assert versions(stable)["tier-small@v1"] == versions(with_candidate())["tier-small@v1"]
