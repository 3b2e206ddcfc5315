"""A tier's versions in the router: which version serves a request (canary, by a stable hash of
its session), which stable requests are copied to the candidate (shadow), and when the candidate
is rolled back (`RollbackWindow`), for every router replica at once (`VersionBoard`).

A tier's stable version is reached under the tier's own name, its candidate under
`<tier>@<version>` (the transport's keys, `Versions.targets`). `Versions.state` is what a status
route shows: every tier's versions, their weights, health and any rollback's reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import AppConfig, RollbackRule, TierConfig
from ..serve_config import version_id

logger = logging.getLogger("ray.serve")
SESSION_HEADER = "x-session-id"
SERVED_HEADER = "x-served-version"
BUCKETS = 10_000  # a session's bucket, in hundredths of a percent


def bucket(session: str) -> float:
    """Where a session falls in [0, 100): the same for every router replica and every restart."""
    digest = hashlib.sha256(session.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS * 100 / BUCKETS


def session_of(headers: Mapping[str, str], user: Any, key: str | None) -> str | None:
    """The session a request belongs to: its `x-session-id`, else the OpenAI `user`, else its
    API key; None (a fresh draw per request) without any."""
    session = headers.get(SESSION_HEADER)
    if session:
        return f"s:{session}"
    if isinstance(user, str) and user:
        return f"u:{user}"
    if key:
        return f"k:{key}"
    return None


def server_error(status: int) -> bool:
    """An outcome that counts against a version: the server's failure, not the client's (4xx)
    nor a client that left (499)."""
    return status >= 500


@dataclass(frozen=True)
class Target:
    """One version of a tier as the transport reaches it."""

    tier: str
    version: str
    key: str  # the transport's key: the tier's name (stable) or `<tier>@<version>`
    candidate: bool
    config: TierConfig


def candidate_key(tier: str, version: str) -> str:
    return version_id(tier, version)


def targets(config: AppConfig) -> dict[str, TierConfig]:
    """Every version of every tier under its transport key (a candidate as a tier of its own)."""
    out: dict[str, TierConfig] = {}
    for tier in config.tiers:
        out[tier.name] = tier
        if tier.candidate is not None:
            candidate = tier.candidate_tier()
            if candidate.replicas.min == 0:  # no spare lease: renewing it would wake it
                tuning = candidate.tuning.model_copy(update={"lease_spare_s": 0.0})
                candidate = candidate.model_copy(update={"tuning": tuning})
            out[candidate_key(tier.name, tier.candidate.version)] = candidate
    return out


class RollbackWindow:
    """A candidate's outcomes over the rule's last `window_s`: server errors and durations."""

    def __init__(self, rule: RollbackRule) -> None:
        self.rule = rule
        self._outcomes: deque[tuple[float, bool, float | None]] = deque()

    def add(self, now: float, failed: bool, seconds: float | None) -> None:
        self._outcomes.append((now, failed, seconds))
        self._prune(now)

    def _prune(self, now: float) -> None:
        start = now - self.rule.window_s
        while self._outcomes and self._outcomes[0][0] < start:
            self._outcomes.popleft()

    def stats(self, now: float) -> dict[str, float | int | None]:
        self._prune(now)
        count = len(self._outcomes)
        failed = sum(1 for _, bad, _ in self._outcomes if bad)
        return {
            "requests": count,
            "error_rate": failed / count if count else 0.0,
            "p99_s": p99([s for _, _, s in self._outcomes if s is not None]),
        }

    def verdict(self, now: float) -> str | None:
        """Why the candidate must be rolled back, or None (too few requests, or within bounds)."""
        stats, rule = self.stats(now), self.rule
        count = int(stats["requests"] or 0)
        if count < rule.min_requests:
            return None
        rate = float(stats["error_rate"] or 0.0)
        if rate > rule.max_error_rate:
            return (
                f"error_rate: {rate:.1%} of {count} requests in {rule.window_s:g}s failed "
                f"(max {rule.max_error_rate:.1%})"
            )
        latency = stats["p99_s"]
        if rule.max_p99_s is not None and latency is not None and latency > rule.max_p99_s:
            return (
                f"p99_latency: {latency:.2f}s over {count} requests in {rule.window_s:g}s "
                f"(max {rule.max_p99_s:g}s)"
            )
        return None


def p99(values: list[float]) -> float | None:
    """The 99th percentile (nearest rank), None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Rollback:
    reason: str  # `<code>: <what breached>`
    at: float  # wall-clock seconds

    @property
    def code(self) -> str:
        """`error_rate` or `p99_latency` (a metric label)."""
        return self.reason.partition(":")[0]


class Versions:
    """The versions of every tier in one router replica: the canary's choice, the shadow's
    draw, each candidate's rollback window, and the rollbacks decided (here or by another
    replica, through the board)."""

    def __init__(
        self,
        config: AppConfig,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self._draw = draw
        self._windows: dict[str, RollbackWindow] = {}
        self.rolled_back: dict[str, Rollback] = {}  # candidate key -> why
        self.update(config)

    def update(self, config: AppConfig) -> None:
        """The versions as configured now: a candidate that stays (same tier and version) keeps
        its window and its rollback; one that changed or is gone forgets them."""
        self._config = config
        self._targets = targets(config)
        live = {key for key, tier in self._targets.items() if key != tier.name}
        for key in list(self._windows):
            if key not in live:
                del self._windows[key]
        for key in list(self.rolled_back):
            if key not in live:
                del self.rolled_back[key]
        for tier in config.tiers:
            if tier.candidate is not None:
                key = candidate_key(tier.name, tier.candidate.version)
                window = self._windows.get(key)
                if window is None or window.rule != tier.candidate.rollback:
                    self._windows[key] = RollbackWindow(tier.candidate.rollback)

    @property
    def candidates(self) -> list[str]:
        """The keys of every configured candidate."""
        return list(self._windows)

    def target(self, key: str) -> Target:
        config = self._targets[key]
        tier = self._config.tier(config.name)
        return Target(tier.name, config.version_label, key, key != tier.name, config)

    def stable(self, tier: str) -> Target:
        return self.target(tier)

    def candidate(self, tier: str) -> Target | None:
        """The tier's candidate while it takes traffic (configured, not rolled back)."""
        config = self._config.tier(tier)
        if config.candidate is None:
            return None
        key = candidate_key(tier, config.candidate.version)
        if key in self.rolled_back:
            return None
        return self.target(key)

    def pick(self, tier: str, session: str | None) -> Target:
        """The version that serves a request of `tier`: the candidate for the sessions whose
        bucket falls below its weight, else the stable version."""
        candidate = self.candidate(tier)
        if candidate is None:
            return self.stable(tier)
        weight = self._config.tier(tier).candidate.weight_percent  # type: ignore[union-attr]
        where = bucket(session) if session is not None else self._draw() * 100
        return candidate if where < weight else self.stable(tier)

    def other(self, target: Target) -> Target | None:
        """Where a request the version could not take goes instead: the other version; the
        candidate only while it takes a share of the traffic (a shadowed one serves nobody)."""
        if target.candidate:
            return self.stable(target.tier)
        candidate = self._config.tier(target.tier).candidate
        if candidate is None or candidate.weight_percent <= 0:
            return None
        return self.candidate(target.tier)

    def shadow(self, target: Target) -> Target | None:
        """The candidate a stable-served request is copied to, if this one is drawn."""
        if target.candidate:
            return None
        candidate = self.candidate(target.tier)
        if candidate is None:
            return None
        share = self._config.tier(target.tier).candidate.shadow_percent  # type: ignore[union-attr]
        return candidate if share > 0 and self._draw() * 100 < share else None

    def observe(self, key: str, status: int, seconds: float | None) -> Rollback | None:
        """A candidate's outcome (a served request or a shadow copy); the rollback it decides,
        once, when its window breaches the rule. `seconds` None: an outcome that counts for the
        error rate only (a shadow copy's whole answer is not a client's latency)."""
        window = self._windows.get(key)
        if window is None or key in self.rolled_back:
            return None
        now = self._clock()
        window.add(now, server_error(status), seconds)
        reason = window.verdict(now)
        if reason is None:
            return None
        return self.roll_back(key, reason)

    def roll_back(self, key: str, reason: str, at: float | None = None) -> Rollback | None:
        """Send the candidate's traffic back to the stable version (None: already so, or no
        such candidate)."""
        if key not in self._windows or key in self.rolled_back:
            return None
        rollback = Rollback(reason, time.time() if at is None else at)
        self.rolled_back[key] = rollback
        tier, _, version = key.partition("@")
        logger.warning(
            "tier %r: candidate version %r rolled back to the stable version: %s",
            tier,
            version,
            reason,
        )
        return rollback

    def merge(self, board: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """The rollbacks every replica knows (`VersionBoard.sync`): those new here are applied;
        their keys are returned."""
        new = []
        for key, entry in board.items():
            if self.roll_back(key, str(entry["reason"]), float(entry["at"])) is not None:
                new.append(key)
        return new

    def state(self) -> dict[str, Any]:
        """Every tier's versions, as a status route shows them."""
        now = self._clock()
        tiers: dict[str, Any] = {}
        for tier in self._config.tiers:
            stable = {
                "version": tier.version_label,
                "application": _app(tier.name, tier.version),
            }
            entry: dict[str, Any] = {"stable": stable, "candidate": None}
            candidate = tier.candidate
            if candidate is not None:
                key = candidate_key(tier.name, candidate.version)
                rollback = self.rolled_back.get(key)
                window = self._windows[key]
                entry["candidate"] = {
                    "version": candidate.version,
                    "application": _app(tier.name, candidate.version),
                    "weight_percent": 0.0 if rollback else candidate.weight_percent,
                    "shadow_percent": 0.0 if rollback else candidate.shadow_percent,
                    "configured_weight_percent": candidate.weight_percent,
                    "configured_shadow_percent": candidate.shadow_percent,
                    "health": window.stats(now),
                    "rollback": dict(vars(rollback)) if rollback else None,
                    "rule": candidate.rollback.model_dump(mode="json"),
                }
            tiers[tier.name] = entry
        return {"tiers": tiers}


def _app(tier: str, version: str | None) -> str:
    return f"tier-{tier}" if version is None else f"tier-{tier}@{version}"


class RollbackBoard:
    """The rollbacks decided by any router replica (the `version-board` deployment,
    `serve_app.router.version_board`, holds one): each replica adds its own and reads everyone's."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}

    def sync(
        self, live: list[str], mine: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """`mine`: the caller's rollbacks (kept if new here); `live`: the candidates the caller
        has configured, whose rollbacks it gets back."""
        for key, entry in mine.items():
            self._entries.setdefault(key, dict(entry))
        return {key: entry for key, entry in self._entries.items() if key in live}

    def forget(self, keep: list[str]) -> None:
        """Drop the rollbacks of candidates no longer configured (a new version starts clean)."""
        for key in [k for k in self._entries if k not in keep]:
            del self._entries[key]
