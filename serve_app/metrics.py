"""Every application metric, defined once.

Exported through Ray's metrics agent: each Ray pod serves them on its metrics port (8080) with a
`ray_` prefix, next to Serve's own metrics, so one PodMonitor scrapes everything. Names:

    ray_serve_app_requests_total{tier, version, status}  requests answered by the router (those
                                                         refused before a tier: tier `none`)
    ray_serve_app_in_flight_requests{tier}               requests the router is serving now
    ray_serve_app_time_to_first_token_seconds{tier, version}  histogram (whole answers: their
                                                         end)
    ray_serve_app_inter_token_latency_seconds{tier, version}  histogram, a stream's mean gap
                                                         between writes (one per stream)
    ray_serve_app_request_duration_seconds{tier, version}  histogram, end to end
    ray_serve_app_prompt_tokens_total{tier, version}
    ray_serve_app_completion_tokens_total{tier, version}
        (`version`: the version that served the request, the tier's `version` or `stable`, or
        its candidate's; `none` for requests refused before one was chosen)
    ray_serve_app_version_rolled_back{tier, version, reason}  1 once routers rolled a candidate
                                                         back (reason: error_rate, p99_latency)
    ray_serve_app_shadow_requests_total{tier, version, result}  copies of stable requests sent to
                                                         the candidate: ok, error, dropped (busy)
    ray_serve_app_shadow_latency_ratio{tier, version}    histogram, candidate / stable duration
    ray_serve_app_shadow_token_ratio{tier, version}      histogram, candidate / stable completion
                                                         tokens
    ray_serve_app_shadow_text_similarity{tier, version}  histogram, 0..1 (difflib ratio of texts)
    ray_serve_app_engine_queue{tier}                     engine's waiting queue, per replica
    ray_serve_app_engine_running{tier}                   engine's running batch, per replica
    ray_serve_app_engine_starts_total{tier}              engines started (replica starts)
    ray_serve_app_gpu_seconds_total{tier}                GPU-seconds held: GPUs x replica lifetime
    ray_serve_app_gpu_hour_price_usd{tier}               the tier's `tuning.gpu_hour_price_usd`
    ray_serve_app_engine_leases{tier}                    engine leases routers hold (direct path)
    ray_serve_app_engine_lease_grants_total{tier}        leases granted; kept leases take none
    ray_serve_app_spill_overs_total{tier, to_tier}       requests sent on to an overflow tier
    ray_serve_app_tenant_requests_total{tenant, tier}    admitted requests per API key's tenant
    ray_serve_app_tenant_tokens_total{tenant, tier, feature}  prompt + completion tokens per
                                                         tenant and feature (`x-feature`)
    ray_serve_app_tenant_rejections_total{tenant, reason}  403s and 429s per tenant
    ray_serve_app_admission_queue{tier, priority}        waiting in a tier's admission queue
    ray_serve_app_api_keys_reloads_total{result}         API-keys file reloads: ok, invalid,
                                                         unreadable
    ray_serve_app_tier_state{tier, state}                1 for the tier's current state (every
                                                         router replica exports it: take max)
    ray_serve_app_api_keys_stale                         1 while the keys file on disk is invalid
                                                         or unreadable and the last good keys
                                                         are still in use
"""

from __future__ import annotations

from functools import cache
from typing import Protocol

from ray.serve import metrics

from .config import STABLE


class ShadowResult(Protocol):
    @property
    def result(self) -> str: ...
    @property
    def latency_ratio(self) -> float | None: ...
    @property
    def token_ratio(self) -> float | None: ...
    @property
    def similarity(self) -> float | None: ...


class TokenUsage(Protocol):
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
RATIO_BUCKETS = [0.25, 0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2, 4]
SIMILARITY_BUCKETS = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]


class _Metrics:
    def __init__(self) -> None:
        tier = ("tier",)
        served = ("tier", "version")
        self.requests = metrics.Counter(
            "serve_app_requests",
            "Requests answered, by tier, version and status; those refused before a tier was "
            "chosen under tier `none`.",
            ("tier", "version", "status"),
        )
        self.in_flight = metrics.Gauge("serve_app_in_flight_requests", "Requests in flight.", tier)
        self.ttft = metrics.Histogram(
            "serve_app_time_to_first_token_seconds",
            "Time to the first token (to the whole answer when not streamed).",
            LATENCY_BUCKETS_S, served,
        )  # fmt: skip
        self.itl = metrics.Histogram(
            "serve_app_inter_token_latency_seconds",
            "A stream's mean time between the router's writes after its first, one observation "
            "per streamed request (chunks that arrive together go in one write).",
            LATENCY_BUCKETS_S, served,
        )  # fmt: skip
        self.duration = metrics.Histogram(
            "serve_app_request_duration_seconds", "End-to-end request time.",
            LATENCY_BUCKETS_S, served,
        )  # fmt: skip
        self.prompt_tokens = metrics.Counter("serve_app_prompt_tokens", "Prompt tokens.", served)
        self.completion_tokens = metrics.Counter(
            "serve_app_completion_tokens", "Completion tokens.", served
        )
        self.rolled_back = metrics.Gauge(
            "serve_app_version_rolled_back",
            "1 once the routers rolled the tier's candidate version back to the stable one.",
            ("tier", "version", "reason"),
        )
        self.shadow_requests = metrics.Counter(
            "serve_app_shadow_requests",
            "Copies of stable requests sent to the candidate, by result: ok, error, dropped "
            "(the candidate's copies were all in flight).",
            ("tier", "version", "result"),
        )
        self.shadow_latency_ratio = metrics.Histogram(
            "serve_app_shadow_latency_ratio",
            "The candidate's duration over the stable version's, per shadowed request.",
            RATIO_BUCKETS, served,
        )  # fmt: skip
        self.shadow_token_ratio = metrics.Histogram(
            "serve_app_shadow_token_ratio",
            "The candidate's completion tokens over the stable version's, per shadowed request.",
            RATIO_BUCKETS, served,
        )  # fmt: skip
        self.shadow_similarity = metrics.Histogram(
            "serve_app_shadow_text_similarity",
            "How alike the two versions' texts are (difflib ratio, 0..1), per shadowed request.",
            SIMILARITY_BUCKETS, served,
        )  # fmt: skip
        self.engine_queue = metrics.Gauge("serve_app_engine_queue", "Engine queue.", tier)
        self.engine_running = metrics.Gauge("serve_app_engine_running", "Engine batch.", tier)
        self.engine_starts = metrics.Counter("serve_app_engine_starts", "Engines started.", tier)
        self.gpu_seconds = metrics.Counter(
            "serve_app_gpu_seconds", "GPU-seconds the tier's replicas held (GPUs x lifetime).", tier
        )
        self.gpu_hour_price = metrics.Gauge(
            "serve_app_gpu_hour_price_usd", "What one GPU of the tier costs per hour.", tier
        )
        self.engine_leases = metrics.Gauge(
            "serve_app_engine_leases", "Engine leases held by routers (direct data path).", tier
        )
        self.lease_grants = metrics.Counter(
            "serve_app_engine_lease_grants",
            "Engine leases granted (direct data path); requests on kept leases take none.",
            tier,
        )
        self.tenant_requests = metrics.Counter(
            "serve_app_tenant_requests", "Admitted requests per tenant.", ("tenant", "tier")
        )
        self.tenant_tokens = metrics.Counter(
            "serve_app_tenant_tokens",
            "Tokens per tenant, and per feature (the x-feature header; `none` without one).",
            ("tenant", "tier", "feature"),
        )
        self.tenant_rejections = metrics.Counter(
            "serve_app_tenant_rejections", "Refused requests per tenant.", ("tenant", "reason")
        )
        self.admission_queue = metrics.Gauge(
            "serve_app_admission_queue", "Requests waiting for a turn.", ("tier", "priority")
        )
        self.spill_overs = metrics.Counter(
            "serve_app_spill_overs", "Requests sent on to an overflow tier.", ("tier", "to_tier")
        )
        self.keys_reloads = metrics.Counter(
            "serve_app_api_keys_reloads", "API-keys file reloads, by outcome.", ("result",)
        )
        self.tier_state = metrics.Gauge(
            "serve_app_tier_state",
            "1 for each tier's current state (scheduling, starting, filling_cache, loading, "
            "idle, ready, failed, ...), 0 for the others.",
            ("tier", "state"),
        )
        self.keys_stale = metrics.Gauge(
            "serve_app_api_keys_stale",
            "1 while the API-keys file on disk is invalid and the last good keys are in use.",
        )


@cache
def app_metrics() -> _Metrics:
    """The process's metrics, created on first use (inside a Ray worker, not at import)."""
    return _Metrics()


def keys_reloaded(outcome: str) -> None:
    """An API-keys file was (re)loaded: `ok`, `invalid` or `unreadable` (the last good keys
    stay in use, and the stale gauge says so until a good version is loaded)."""
    m = app_metrics()
    m.keys_reloads.inc(1, {"result": outcome})
    m.keys_stale.set(0 if outcome == "ok" else 1)


def tier_state(tier: str, state: str, value: float) -> None:
    """A tier's state as the router sees it (`serve_app.router.tier_watch`)."""
    app_metrics().tier_state.set(value, {"tier": tier, "state": str(state)})


class FeatureLabels:
    """A caller-set feature as a metric label: the first `limit` distinct ones by name, the rest
    as `other`, so that no caller can grow the metric without bound."""

    def __init__(self, limit: int = 100) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def label(self, feature: str | None) -> str:
        if feature is None:
            return "none"
        if feature in self._seen:
            return feature
        if len(self._seen) < self._limit:
            self._seen.add(feature)
            return feature
        return "other"


class MetricsRecorder:
    """Request outcomes into the application's metrics (the router's `Recorder`)."""

    def __init__(self) -> None:
        self._features = FeatureLabels()

    def in_flight(self, tier: str, count: int) -> None:
        app_metrics().in_flight.set(count, {"tier": tier})

    def first_token(self, tier: str, seconds: float, version: str = STABLE) -> None:
        app_metrics().ttft.observe(seconds, {"tier": tier, "version": version})

    def between_tokens(self, tier: str, seconds: float, version: str = STABLE) -> None:
        app_metrics().itl.observe(seconds, {"tier": tier, "version": version})

    def finished(
        self, tier: str, status: int, seconds: float, usage: TokenUsage, version: str = STABLE
    ) -> None:
        m, tags = app_metrics(), {"tier": tier, "version": version}
        m.requests.inc(1, {**tags, "status": str(status)})
        m.duration.observe(seconds, tags)
        if usage.prompt_tokens:
            m.prompt_tokens.inc(usage.prompt_tokens, tags)
        if usage.completion_tokens:
            m.completion_tokens.inc(usage.completion_tokens, tags)

    def refused(self, tier: str, status: int) -> None:
        """A request answered before admission (`tier`: the one it asked for, or `none`)."""
        app_metrics().requests.inc(1, {"tier": tier, "version": "none", "status": str(status)})

    def rolled_back(self, tier: str, version: str, reason: str) -> None:
        app_metrics().rolled_back.set(1, {"tier": tier, "version": version, "reason": reason})

    def shadowed(self, tier: str, version: str, comparison: ShadowResult) -> None:
        """A shadow copy's outcome, and its comparison with the stable answer when both are in."""
        m, tags = app_metrics(), {"tier": tier, "version": version}
        m.shadow_requests.inc(1, {**tags, "result": comparison.result})
        if comparison.latency_ratio is not None:
            m.shadow_latency_ratio.observe(comparison.latency_ratio, tags)
        if comparison.token_ratio is not None:
            m.shadow_token_ratio.observe(comparison.token_ratio, tags)
        if comparison.similarity is not None:
            m.shadow_similarity.observe(comparison.similarity, tags)

    def spill_over(self, tier: str, to_tier: str) -> None:
        app_metrics().spill_overs.inc(1, {"tier": tier, "to_tier": to_tier})

    def tenant_request(self, tenant: str, tier: str) -> None:
        app_metrics().tenant_requests.inc(1, {"tenant": tenant, "tier": tier})

    def tenant_tokens(self, tenant: str, tier: str, tokens: int, feature: str | None) -> None:
        if tokens > 0:
            label = self._features.label(feature)
            app_metrics().tenant_tokens.inc(
                tokens, {"tenant": tenant, "tier": tier, "feature": label}
            )

    def tenant_rejection(self, tenant: str, reason: str) -> None:
        app_metrics().tenant_rejections.inc(1, {"tenant": tenant, "reason": reason})
