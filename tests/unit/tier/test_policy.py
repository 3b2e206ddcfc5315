"""Tier choice: names, aliases, `auto` rules, spill-over (pure)."""

from __future__ import annotations

import pytest

from serve_app.config import AppConfig
from serve_app.errors import ModelNotFound
from serve_app.tier.policy import RequestTraits, TierPolicy

CONFIG = AppConfig.model_validate(
    {
        "router": {
            "default_tier": "small",
            "auto_rules": [
                {"tier": "large", "header": "x-quality", "header_value": "high"},
                {"tier": "large", "min_prompt_chars": 1000},
                {"tier": "large", "min_max_tokens": 400},
            ],
        },
        "tiers": [
            {"name": "small", "aliases": ["mini"], "overflow_tier": "large",
             "tuning": {"overflow_at_in_flight": 4}},
            {"name": "large", "max_tokens_limit": 1024},
        ],
    }
)  # fmt: skip
POLICY = TierPolicy(CONFIG)


def traits(chars: int = 10, max_tokens: int | None = None, **headers: str) -> RequestTraits:
    return RequestTraits(chars, max_tokens, {k.replace("_", "-"): v for k, v in headers.items()})


def test_names_and_aliases() -> None:
    assert POLICY.for_model("small", traits(), {}).reason == "model"
    alias = POLICY.for_model("mini", traits(), {})
    assert (alias.tier, alias.reason) == ("small", "alias mini")
    with pytest.raises(ModelNotFound) as info:
        POLICY.for_model("medium", traits(), {})
    assert "small, mini, large, auto" in info.value.message


@pytest.mark.parametrize(
    ("request_traits", "tier", "reason"),
    [
        (traits(x_quality="high"), "large", "auto rule 0"),
        (traits(x_quality="low"), "small", "auto default"),
        (traits(chars=1500), "large", "auto rule 1"),
        (traits(max_tokens=500), "large", "auto rule 2"),
        (traits(max_tokens=100), "small", "auto default"),
    ],
)
def test_auto_rules_in_order(request_traits: RequestTraits, tier: str, reason: str) -> None:
    choice = POLICY.for_model("auto", request_traits, {})
    assert (choice.tier, choice.reason) == (tier, reason)


def test_spill_over_while_saturated_and_back() -> None:
    assert POLICY.for_model("small", traits(), {"small": 3}).tier == "small"
    spilled = POLICY.for_model("small", traits(), {"small": 4})
    assert (spilled.tier, spilled.spilled_from) == ("large", "small")
    assert spilled.reason == "spill-over from small (model)"
    assert POLICY.for_model("large", traits(), {"small": 9, "large": 9}).tier == "large"


def test_tgi_routes_use_the_header_or_the_default() -> None:
    assert POLICY.for_header(None).tier == "small"
    assert POLICY.for_header("large").reason == "X-Tier header"


def test_spill_over_only_to_a_tier_the_key_may_use() -> None:
    small_only = frozenset({"small"})
    stays = POLICY.for_model("small", traits(), {"small": 9}, small_only)
    assert (stays.tier, stays.spilled_from) == ("small", None)
    spilled = POLICY.for_model("small", traits(), {"small": 9}, frozenset({"small", "large"}))
    assert spilled.tier == "large"


def test_unknown_names_follow_the_fallback_settings() -> None:
    with pytest.raises(ModelNotFound):
        POLICY.for_model("dummy", traits(), {})
    unknown = POLICY.for_header("tgi")  # TGI answers any name: the default tier by default
    assert (unknown.tier, unknown.reason) == ("small", "fallback for unknown X-Tier")
    args = CONFIG.model_dump()
    args["router"]["fallback_tier"] = "large"
    args["router"]["tuning"]["tgi_any_tier_name"] = False
    strict = TierPolicy(AppConfig.model_validate(args))
    choice = strict.for_model("dummy", traits(), {})
    assert (choice.tier, choice.reason) == ("large", "fallback for an unknown model")
    with pytest.raises(ModelNotFound):
        strict.for_header("tgi")


@pytest.mark.parametrize(
    ("allowed", "names"),
    [
        (None, {"small", "mini", "large", "auto"}),
        (frozenset({"small"}), {"small", "mini"}),  # auto may pick large
        (frozenset({"large"}), {"large"}),
    ],
)
def test_models_a_key_may_use(allowed: frozenset[str] | None, names: set[str]) -> None:
    assert set(POLICY.models_for(allowed)) == names
