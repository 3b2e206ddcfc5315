"""Where a request picks its tier."""

from __future__ import annotations

from ..config import AppConfig
from ..errors import ModelNotFound


class TierDirectory:
    """Model names (tier names and aliases) to tier names."""

    def __init__(self, config: AppConfig) -> None:
        self._by_model = {name: tier.name for tier in config.tiers for name in tier.model_names}
        self.default = config.default_tier

    @property
    def model_names(self) -> list[str]:
        return list(self._by_model)

    def for_model(self, model: str) -> str:
        try:
            return self._by_model[model]
        except KeyError:
            raise ModelNotFound(
                f"The model {model!r} does not exist. Available models: "
                f"{', '.join(self._by_model)}",
                param="model",
            ) from None

    def for_header(self, tier: str | None) -> str:
        """TGI-native routes pick a tier with the X-Tier header (a tier name or alias)."""
        if tier is None:
            return self.default
        try:
            return self._by_model[tier]
        except KeyError:
            raise ModelNotFound(
                f"X-Tier {tier!r} names no tier. Available: {', '.join(self._by_model)}",
                param="X-Tier",
            ) from None
