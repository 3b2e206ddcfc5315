"""The configuration model: the shipped config is valid, and bad ones name the bad field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.app import build_app
from serve_app.config import AppConfig, QueueScaling, ReplicaBounds, TierTuning
from serve_app.config_doc import tuning_settings, user_settings

from .shipped_config import local_args, set_path


def test_shipped_config_is_valid() -> None:
    config = AppConfig.model_validate(local_args())
    assert [t.name for t in config.tiers] == ["small", "large"]
    assert config.default_tier == "small"
    assert config.tier("large").model_names == ("large", "gpt-4o")


INVALID = [
    # (field path to change, new value, text the error must contain)
    ("tiers", [], "tiers"),
    ("tiers.0.name", "Small_Tier", "tiers.0"),
    ("tiers.0.gpus_per_replica", -1, "tiers.0.gpus_per_replica"),
    ("tiers.0.engine.max_total_tokens", 0, "tiers.0.engine.max_total_tokens"),
    ("tiers.0.engine.max_input_tokens", 4096, "max_input_tokens (4096) must be less than"),
    ("tiers.0.engine.launcher", "sglang", "tiers.0.engine.launcher"),
    ("tiers.0.engine.model_id", "", "tiers.0.engine.model_id"),
    ("tiers.0.engine.dtype", "float8", "tiers.0.engine.dtype"),
    ("tiers.0.max_tokens_limit", 100_000, "max_tokens_limit (100000) must be below"),
    ("tiers.0.default_max_tokens", 600, "default_max_tokens (600) exceeds"),
    ("tiers.1.replicas.min", 3, "min (3) must not exceed max (1)"),
    ("tiers.0.replicas.max", 0, "tiers.0.replicas.max"),
    ("tiers.0.engine.tuning.startup_timeout_s", -5, "tiers.0.engine.tuning.startup_timeout_s"),
    ("tiers.0.request_timeout_s", "soon", "tiers.0.request_timeout_s"),
    ("tiers.1.aliases", ["gpt-4o-mini"], "'gpt-4o-mini' is used by tiers 'small' and 'large'"),
    ("tiers.1.name", "small", "'small' is used by tiers"),
    ("router.default_tier", "medium", "router.default_tier 'medium' is not one of the tiers"),
    ("router.tuning.max_body_bytes", 0, "router.tuning.max_body_bytes"),
    ("tiers.0.max_token_limit", 10, "tiers.0.max_token_limit"),  # a typo: unknown field
    ("routers", {}, "routers"),
    ("tiers.0.engine.launcher", "tgi", "tuning.threads applies to the local engine only"),
    ("tiers.0.engine", {"launcher": "tgi"}, "a 'tgi' engine needs gpus_per_replica >= 1"),
    ("tiers.0.overflow_tier", "small", "overflow_tier 'small' must be another tier"),
    ("tiers.0.overflow_tier", "medium", "overflow_tier 'medium' must be another tier"),
    ("router.auto_rules", [{"tier": "medium", "min_max_tokens": 5}], "auto_rules[0].tier 'medium'"),
    ("router.auto_rules", [{"tier": "large"}], "a rule needs min_prompt_chars"),
    ("tiers.1.aliases", ["auto"], "'auto' is reserved"),
    ("router.api_keys", {"file": "/k", "tuning": {"reload_interval_s": 61}}, "reload_interval_s"),
    ("router.api_keys", {"file": "/k", "tuning": {"reload_interval_s": 0}}, "reload_interval_s"),
    ("router.ray_resources", {"serve_app_router": "one"}, "router.ray_resources"),
    ("tiers.0.engine.tuning.graceful_termination_timeout_s", 0.5, "graceful_termination_timeout_s"),
    ("tiers.0.engine.quantize", "fp-8", "tiers.0.engine.quantize"),
]


@pytest.mark.parametrize(("path", "value", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_config_names_the_field(path: str, value: Any, message: str) -> None:
    args = local_args()
    set_path(args, path, value)
    with pytest.raises(ValidationError) as info:
        build_app(args)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"fallback_tier": "medium"}, "router.fallback_tier 'medium' is not one of the tiers"),
        ({"api_keys": {"on_ledger_failure": "maybe"}}, "router.api_keys.on_ledger_failure"),
        ({"tuning": {"max_messages": 0}}, "router.tuning.max_messages"),
    ],
)
def test_router_settings_are_checked(router: dict[str, Any], message: str) -> None:
    args = local_args()
    args["router"].update(router)
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        AppConfig.model_validate(args)


def test_a_spare_lease_is_kept_only_for_tiers_that_keep_leases_and_never_scale_to_zero() -> None:
    """As the router replicas see the tier: built from `for_router`, without `replicas`."""

    def tier(**changes: Any) -> Any:
        args = local_args()
        args["tiers"][0].update(changes)
        return AppConfig.model_validate(args).for_router().tiers[0]

    assert tier(replicas={"min": 1, "max": 2}).keeps_spare_lease
    assert not tier(replicas={"min": 0, "max": 2}).keeps_spare_lease  # a renewal would wake it
    assert not tier(tuning={"lease_spare_s": 0}).keeps_spare_lease
    assert not tier(tuning={"lease_reuse_s": 0}).keeps_spare_lease
    assert not tier(tuning={"data_path": "relay"}).keeps_spare_lease
    # scaling between counts of one or more replicas leaves the routers' config alone
    assert tier(replicas={"min": 1, "max": 2}) == tier(replicas={"min": 3, "max": 5})


# Every setting that moved into a `tuning` section: where it was, and its default (unchanged).
MOVED: dict[str, Any] = {
    "tiers.0.cpus_per_replica": 0.0,
    "tiers.0.data_path": "direct",
    "tiers.0.lease_reuse_s": 2.0,
    "tiers.0.lease_idle_s": 1.0,
    "tiers.0.lease_spare_s": 30.0,
    "tiers.0.max_ongoing_requests": 64,
    "tiers.0.max_queued_requests": 256,
    "tiers.0.overflow_at_in_flight": 32,
    "tiers.0.max_start_attempts": 3,
    "tiers.0.engine.max_concurrent_requests": 128,
    "tiers.0.engine.max_batch_size": None,
    "tiers.0.engine.threads": None,
    "tiers.0.engine.startup_timeout_s": 900.0,
    "tiers.0.engine.graceful_termination_timeout_s": 30,
    "tiers.0.routing.prefix_chars": 1024,
    "tiers.0.routing.prefix_view_size": 256,
    "tiers.0.routing.affinity_margin_s": 0.5,
    "tiers.0.routing.session_margin_s": 2.0,
    "tiers.0.routing.token_time_s": 0.03,
    "tiers.0.routing.prefill_token_fraction": 0.02,
    "tiers.0.routing.kv_pressure_limit": 0.9,
    "tiers.0.routing.stats_period_s": 0.5,
    "tiers.0.admission.max_queued": 256,
    "tiers.0.admission.reserved_turns": None,
    "tiers.0.admission.idle_after_s": 10.0,
    "tiers.0.scaling.max_step_up": 4,
    "tiers.0.scaling.max_step_down": 1,
    "tiers.0.scaling.hysteresis": 0.2,
    "router.max_body_bytes": 2_000_000,
    "router.body_timeout_s": 30.0,
    "router.max_header_bytes": 16_384,
    "router.max_json_depth": 64,
    "router.max_messages": 1_000,
    "router.tgi_any_tier_name": True,
    "router.api_keys.reload_interval_s": 10,
    "router.api_keys.ledger_timeout_s": 1.0,
}


def every_section() -> dict[str, Any]:
    """A config with every optional section present (at its defaults where it has them)."""
    tier = {"name": "a", "routing": {}, "admission": {"max_in_flight": 8}}
    return {"tiers": [tier], "router": {"api_keys": {"env": "KEYS"}}}


def moved_to(old: str) -> str:
    *section, name = old.split(".")
    return ".".join([*section, "tuning", name])


def value_at(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = config[int(part)] if part.isdigit() else getattr(config, part)
    return config


@pytest.mark.parametrize(("old", "default"), MOVED.items(), ids=list(MOVED))
def test_a_setting_at_its_old_place_says_where_it_moved(old: str, default: Any) -> None:
    args = every_section()
    set_path(args, old, default)
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args)
    *section, name = old.split(".")
    (error,) = [e for e in info.value.errors() if "moved" in e["msg"]]
    assert ".".join(map(str, error["loc"])) == ".".join(section)
    assert error["msg"].endswith(f"`{name}` moved to `tuning.{name}`")


def test_every_moved_setting_of_a_section_is_named_at_once() -> None:
    args = every_section()
    args["tiers"][0].update({"lease_idle_s": 0, "data_path": "relay"})
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args)
    both = "`lease_idle_s` moved to `tuning.lease_idle_s`; `data_path` moved to `tuning.data_path`"
    assert both in str(info.value)


@pytest.mark.parametrize(("old", "default"), MOVED.items(), ids=list(MOVED))
def test_tuning_keeps_the_old_defaults(old: str, default: Any) -> None:
    config = AppConfig.model_validate(every_section())
    assert value_at(config, moved_to(old)) == default


# Tuning settings that never lived anywhere else: the grammar policy, request bounds and the
# time bound of counting a prompt's tokens.
NEW_IN_TUNING = {
    *(f"tiers[].tuning.grammar.{name}" for name in (
        "allow_regex", "max_pattern_chars", "max_schema_bytes", "max_schema_depth",
        "check_timeout_s",
    )),
    "router.tuning.max_tools",
    "router.tuning.max_stop_chars",
    "router.tuning.body_bytes_per_input_token",
    "router.api_keys.tuning.tokenize_timeout_s",
    "tiers[].tuning.require_max_tokens",
    "tiers[].tuning.gpu_hour_price_usd",
    "tiers[].engine.tuning.python",
    "tiers[].engine.tuning.cpu_kv_cache_gib",
}  # fmt: skip


def test_the_moved_settings_and_the_new_ones_are_exactly_the_tuning_settings() -> None:
    moved = {moved_to(old).replace("tiers.0.", "tiers[].") for old in MOVED}
    assert moved | NEW_IN_TUNING == {s.path for s in tuning_settings()}
    assert not moved & NEW_IN_TUNING


def test_a_platform_engineer_decides_at_most_40_settings() -> None:
    assert len(user_settings()) <= 40
    assert not any(".tuning." in s.path for s in user_settings())


def test_lease_fraction_is_gone_with_a_word_on_it() -> None:
    args = every_section()
    args["router"]["api_keys"]["lease_fraction"] = 0.1
    with pytest.raises(ValidationError, match="`lease_fraction` is no longer used: remove it"):
        AppConfig.model_validate(args)


def test_an_unknown_tuning_setting_is_an_error_naming_it() -> None:
    args = every_section()
    set_path(args, "tiers.0.tuning.lease_idle", 1)
    with pytest.raises(ValidationError, match=r"tiers\.0\.tuning\.lease_idle\n"):
        AppConfig.model_validate(args)


def test_replicas_are_built_without_the_builder_only_settings() -> None:
    """`for_replicas` resets `BUILDER_ONLY`, `tuning.max_start_attempts` included, and keeps
    the rest of the tuning."""
    args = every_section()
    args["tiers"][0].update(
        replicas={"min": 1, "max": 3},
        scaling={"target_per_replica": 2, "tuning": {"max_step_up": 1}},
        ray_resources={"tier_a": 1},
        tuning={"max_start_attempts": 1, "lease_idle_s": 3},
    )
    tier = AppConfig.model_validate(args).tiers[0]
    built = tier.for_replicas()
    assert (built.replicas, built.scaling, built.ray_resources) == (
        ReplicaBounds(),
        QueueScaling(),
        {},
    )
    assert built.tuning == TierTuning(lease_idle_s=3)
    assert tier.tuning.max_start_attempts == 1  # the builder still reads it
    assert build_app(args)  # and Serve takes it (max_constructor_retry_count)
