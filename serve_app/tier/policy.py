"""Where a request picks its tier: by model name, by the `auto` rules, then spill-over.

A request names a tier (or alias) in `model`, or asks for `auto`, whose rules pick a tier from
the request itself. A tier that is saturated (its in-flight requests at this router at or above
`tuning.overflow_at_in_flight`) hands the request to its `overflow_tier`, one hop at most. Every
choice comes with a reason, sent back to the client as `x-tier-reason`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import AUTO_MODEL, AppConfig, AutoRule
from ..errors import ModelNotFound


@dataclass(frozen=True)
class RequestTraits:
    """What the `auto` rules look at, taken from a request once."""

    prompt_chars: int
    max_tokens: int | None
    headers: Mapping[str, str]


@dataclass(frozen=True)
class TierChoice:
    tier: str
    reason: str
    spilled_from: str | None = None


class TierPolicy:
    def __init__(self, config: AppConfig) -> None:
        self._by_model = {name: tier.name for tier in config.tiers for name in tier.model_names}
        self._config = config
        self.default = config.default_tier
        self.fallback = config.router.fallback_tier
        self._tgi_fallback = config.router.fallback_tier or config.default_tier
        self._tgi_any_name = config.router.tuning.tgi_any_tier_name

    @property
    def model_names(self) -> list[str]:
        return [*self._by_model, AUTO_MODEL]

    def tier_of(self, model: str) -> str | None:
        """The tier a model name (or alias) names; None for `auto` and unknown names."""
        return self._by_model.get(model)

    def is_model(self, model: str) -> bool:
        return model == AUTO_MODEL or model in self._by_model

    def for_model(
        self,
        model: str,
        traits: RequestTraits,
        in_flight: Mapping[str, int],
        allowed: frozenset[str] | None = None,
    ) -> TierChoice:
        """`allowed`: the tiers the caller's key may use (None: all); spill-over goes only
        there, else the request stays on its tier and waits its turn."""
        if model == AUTO_MODEL:
            choice = self._auto(traits)
        elif model not in self._by_model and self.fallback is not None:
            # the reason is a response header: the client's model name stays out of it
            choice = TierChoice(self.fallback, "fallback for an unknown model")
        else:
            tier = self._named(model, "model")
            choice = TierChoice(tier, "model" if tier == model else f"alias {model}")
        return self._spill_over(choice, in_flight, allowed)

    def for_header(self, tier: str | None) -> TierChoice:
        """TGI-native routes pick a tier with the X-Tier header (a tier name or alias)."""
        if tier is None:
            return TierChoice(self.default, "default tier")
        if tier not in self._by_model and self._tgi_any_name:
            return TierChoice(self._tgi_fallback, "fallback for unknown X-Tier")
        return TierChoice(self._named(tier, "X-Tier"), "X-Tier header")

    def models_for(self, allowed: frozenset[str] | None) -> list[str]:
        """The model names a key may use; `auto` when every tier it may pick is allowed."""
        if allowed is None:
            return self.model_names
        names = [name for name, tier in self._by_model.items() if tier in allowed]
        auto_tiers = {self.default, *(rule.tier for rule in self._config.router.auto_rules)}
        return [*names, AUTO_MODEL] if auto_tiers <= allowed else names

    def _named(self, name: str, param: str) -> str:
        try:
            return self._by_model[name]
        except KeyError:
            raise ModelNotFound(
                f"The model {name!r} does not exist. Available models: "
                f"{', '.join(self.model_names)}",
                param=param,
            ) from None

    def _auto(self, traits: RequestTraits) -> TierChoice:
        for i, rule in enumerate(self._config.router.auto_rules):
            if _matches(rule, traits):
                return TierChoice(rule.tier, f"auto rule {i}")
        return TierChoice(self.default, "auto default")

    def _spill_over(
        self, choice: TierChoice, in_flight: Mapping[str, int], allowed: frozenset[str] | None
    ) -> TierChoice:
        tier = self._config.tier(choice.tier)
        if tier.overflow_tier is None or (
            allowed is not None and tier.overflow_tier not in allowed
        ):
            return choice
        if in_flight.get(tier.name, 0) >= tier.tuning.overflow_at_in_flight:
            reason = f"spill-over from {tier.name} ({choice.reason})"
            return TierChoice(tier.overflow_tier, reason, spilled_from=tier.name)
        return choice


def _matches(rule: AutoRule, traits: RequestTraits) -> bool:
    if rule.min_prompt_chars is not None and traits.prompt_chars < rule.min_prompt_chars:
        return False
    if rule.min_max_tokens is not None and (traits.max_tokens or 0) < rule.min_max_tokens:
        return False
    if rule.header is not None:
        value = traits.headers.get(rule.header.lower())
        if value is None or (rule.header_value is not None and value != rule.header_value):
            return False
    return True
