"""The application's one configuration model.

Everything the application does is decided by an `AppConfig`, parsed from the `args` of a Serve
config file (see `configs/local.yaml`). Models forbid unknown fields so that a typo is an error at
deploy time, pointing at the field, rather than a silently ignored setting.

Each section holds what a platform engineer decides; the mechanism behind it (buffer sizes,
intervals, lease timings, cost-model constants) sits in the section's `tuning`, whose defaults
suit most deployments. `docs/configuration.md` lists every setting (`make docs` writes it).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import vllm_args

TIER_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
VERSION_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,18}[a-z0-9])?$")
# A tier's stable version when it has no `version` name (metrics, headers, the status).
STABLE = "stable"
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
M = TypeVar("M", bound=BaseModel)
# TGI 3.3.7's `--quantize` values: a typo is an error at deploy time, not on the GPU node.
Quantize = Literal[
    "awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin",
    "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8",
]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Tuned(_Strict):
    """A section with a `tuning` sub-section. A tuning setting given at the section's own level
    (where older configs had it) is an error that says where it went."""

    @model_validator(mode="before")
    @classmethod
    def _moved_to_tuning(cls, data: Any) -> Any:
        if isinstance(data, dict):
            tuning = getattr(cls.model_fields["tuning"].annotation, "model_fields", {})
            moved = [key for key in data if key in tuning]
            if moved:
                raise ValueError("; ".join(f"`{key}` moved to `tuning.{key}`" for key in moved))
        return data


class EngineTuning(_Strict):
    """How the engine process runs and stops."""

    max_concurrent_requests: PositiveInt = Field(
        128,
        description="Requests the engine holds at once, running or waiting in it; past this it "
        "answers 429 (--max-concurrent-requests).",
    )
    max_batch_size: PositiveInt | None = Field(
        None,
        description="Sequences decoded together (--max-batch-size; local engine: parallel "
        "slots); the engine's own choice when unset.",
    )
    threads: PositiveInt | None = Field(
        None,
        description="Local engine only: llama.cpp threads (default: every core). Engines that "
        "share a host's cores should split them, or their threads contend.",
    )
    startup_timeout_s: PositiveFloat = Field(
        900.0,
        description="Download, load and warm-up must finish within this. Where a shared model "
        "cache is mounted (Kubernetes), the replica's fill of it gets as long again before the "
        "engine starts.",
    )
    graceful_termination_timeout_s: PositiveInt = Field(
        30,
        description="How long the engine may drain in-flight requests after SIGTERM (whole "
        "seconds, as TGI's --graceful-termination-timeout).",
    )
    python: str = Field(
        "python",
        min_length=1,
        description="vLLM only: the Python that runs vLLM's OpenAI server (`-m "
        "vllm.entrypoints.openai.api_server`); a path, or a command on the replica's PATH. "
        "Locally `make install-vllm` puts vLLM in .vllm/venv/bin/python.",
    )
    cpu_kv_cache_gib: PositiveInt = Field(
        4,
        description="vLLM on CPU only (gpus_per_replica 0): the KV cache's memory in whole GiB "
        "(VLLM_CPU_KVCACHE_SPACE); 1 GiB holds ~46k bfloat16 tokens of a 135M model.",
    )


class EngineConfig(_Tuned):
    """How one tier's engine process is launched: `text-generation-launcher` flags."""

    launcher: Literal["local", "tgi", "vllm"] = Field(
        "local",
        description="'tgi' runs text-generation-launcher; 'vllm' runs vLLM's OpenAI server; "
        "'local' runs the CPU engine that speaks TGI's protocol and takes its flags.",
    )
    model_id: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="Hugging Face model id or local path (TGI), or a GGUF path or built-in alias "
        "(local engine).",
    )
    revision: str | None = Field(
        None, description="TGI only: the model's branch, tag or commit (--revision)."
    )
    quantize: Quantize | None = Field(None, description="TGI --quantize (e.g. 'awq', 'fp8').")
    dtype: Literal["float16", "bfloat16"] | None = Field(
        None,
        description="The weights' data type (TGI --dtype, vLLM --dtype); the model's own when "
        "unset. Not the local engine's.",
    )
    max_input_tokens: PositiveInt = Field(
        1024, description="Longest prompt, in tokens (--max-input-tokens); longer is a 400."
    )
    max_total_tokens: PositiveInt = Field(
        2048,
        description="Prompt plus generated tokens of one request (--max-total-tokens); what "
        "each request may take of the KV cache.",
    )
    extra_args: tuple[str, ...] = Field(
        (), description="Further launcher flags, passed verbatim after the generated ones."
    )
    tuning: EngineTuning = Field(
        EngineTuning(), description="The engine's queue, batch, threads and start and stop times."
    )

    @property
    def protocol(self) -> Literal["tgi", "openai"]:
        """The API the engine speaks: TGI's (and OpenAI's routes beside it), or OpenAI's only
        (vLLM), for which the router translates TGI's routes (`engine.tgi_over_openai`)."""
        return "openai" if self.launcher == "vllm" else "tgi"

    @model_validator(mode="after")
    def _token_limits(self) -> EngineConfig:
        if self.tuning.threads is not None and self.launcher != "local":
            raise ValueError("tuning.threads applies to the local engine only")
        # set away from their defaults (a dumped config, every field in it, stays valid)
        fields = EngineTuning.model_fields
        vllm_only = {
            name
            for name in ("python", "cpu_kv_cache_gib")
            if getattr(self.tuning, name) != fields[name].default
        }
        if vllm_only and self.launcher != "vllm":
            raise ValueError(f"tuning.{min(vllm_only)} applies to 'vllm' engines only")
        if self.launcher == "vllm":
            refused = vllm_args.refusals(self.quantize, self.extra_args)
            if refused:
                raise ValueError(
                    "settings a 'vllm' engine cannot take (docs/vllm.md): " + "; ".join(refused)
                )
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(
                f"max_input_tokens ({self.max_input_tokens}) must be less than "
                f"max_total_tokens ({self.max_total_tokens})"
            )
        return self


class ReplicaBounds(_Strict):
    """How many replicas a tier runs."""

    min: Annotated[int, Field(ge=0)] = Field(
        1,
        description="Fewest replicas; 0 lets the tier scale to zero and start on the first "
        "request.",
    )
    max: PositiveInt = Field(
        1, description="Most replicas; above min, the tier scales on its queue (scaling)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaBounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ScalingTuning(_Strict):
    """How big and how eager one scaling step is."""

    max_step_up: int = Field(4, ge=1, description="Most replicas added by one decision.")
    max_step_down: int = Field(1, ge=1, description="Most replicas removed by one decision.")
    hysteresis: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Scale down only once one replica fewer would carry the demand with this "
        "share of its capacity to spare, so that a demand at a boundary does not flap.",
    )


class QueueScaling(_Tuned):
    """A tier's queue-based scaling rule; see `serve_app.autoscaling` for how it decides."""

    target_per_replica: float = Field(
        4.0, gt=0, description="Queued plus running requests one replica should carry."
    )
    upscale_delay_s: float = Field(
        3.0,
        ge=0,
        description="How long the demand must call for more replicas before they are added.",
    )
    downscale_delay_s: float = Field(
        60.0,
        ge=0,
        description="How long the demand must fit fewer replicas before one is removed.",
    )
    tuning: ScalingTuning = Field(
        ScalingTuning(), description="How many replicas one decision may add or remove."
    )


class RoutingTuning(_Strict):
    """The replica choice's cost model and prefix memory (`serve_app.tier.replica_choice`)."""

    prefix_chars: PositiveInt = Field(
        1024, description="How much of the prompt (or conversation) the prefix key covers."
    )
    prefix_view_size: PositiveInt = Field(
        256,
        description="Keys the router remembers per replica as probably cached there (TGI "
        "does not tell what its prefix cache holds).",
    )
    affinity_margin_s: float = Field(
        0.5,
        ge=0,
        description="Extra expected cost accepted to stay on a replica that has seen the key.",
    )
    session_margin_s: float = Field(
        2.0,
        ge=0,
        description="The same for a conversation pinned by its `x-session-id` header.",
    )
    token_time_s: PositiveFloat = Field(
        0.03, description="Estimated seconds per generated token in one engine slot."
    )
    prefill_token_fraction: float = Field(
        0.02,
        ge=0,
        description="Cost of one prompt token's prefill, as a fraction of a generated token's.",
    )
    kv_pressure_limit: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Above this KV-cache use (current / max batch tokens), a replica counts as "
        "having no free slot.",
    )
    stats_period_s: PositiveFloat = Field(
        0.5, description="How often each replica publishes its engine's load for routing."
    )


class ReplicaRouting(_Tuned):
    """How requests pick a replica inside a tier; see `serve_app.tier.replica_choice`."""

    prefix_affinity: bool = Field(
        False,
        description="Send requests whose prompts share their leading part to the same replica "
        "(its engine's prefix cache then skips their prefill), unless it is busier than the "
        "best replica by more than tuning.affinity_margin_s.",
    )
    tuning: RoutingTuning = Field(
        RoutingTuning(), description="The replica choice's cost model and prefix memory."
    )


class AdmissionTuning(_Strict):
    """The admission queue's bound and its fair-share bookkeeping."""

    max_queued: Annotated[int, Field(ge=0)] = Field(
        256, description="Requests that may wait; past this, 429 with Retry-After at once."
    )
    reserved_turns: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="Of the max_in_flight turns, how many are kept for tenants below their fair "
        "share, so their requests run at once instead of waiting for a turn to free "
        "(default: max_in_flight // 8, at least 1; 0: none).",
    )
    idle_after_s: PositiveFloat = Field(
        10.0,
        description="How long a tenant counts towards the fair shares after its last request "
        "ended.",
    )


class TierAdmission(_Tuned):
    """A tier's admission queue in each router replica; see `serve_app.router.fair_queue`."""

    max_in_flight: PositiveInt = Field(
        description="Requests of this tier one router replica lets run at once; the rest wait "
        "in the queue, by priority class and fairly across tenants."
    )
    max_wait_s: PositiveFloat = Field(
        30.0, description="Longest wait for a turn before a 429 with Retry-After."
    )
    tuning: AdmissionTuning = Field(
        AdmissionTuning(), description="The queue's bound and its fair-share bookkeeping."
    )

    @property
    def reserve(self) -> int:
        """The turns kept for tenants below their share."""
        if self.tuning.reserved_turns is not None:
            return self.tuning.reserved_turns
        return max(1, self.max_in_flight // 8)

    @model_validator(mode="after")
    def _reserve_fits(self) -> TierAdmission:
        if self.reserve > self.max_in_flight:
            raise ValueError(
                f"reserved_turns ({self.reserve}) must not exceed max_in_flight "
                f"({self.max_in_flight})"
            )
        return self


class GrammarPolicy(_Strict):
    """What grammars a tier's engine is given to compile; see `serve_app.router.grammar`.

    TGI builds a grammar's state machine inside prefill, on the shard's only loop: one that
    takes minutes stops the shard, and its replica is restarted with every tenant's requests."""

    allow_regex: bool = Field(
        True,
        description="Regex grammars (`response_format` or `parameters.grammar` of type `regex`) "
        "are accepted, within max_pattern_chars and check_timeout_s; false: refused (400/422). "
        "Patterns inside JSON schemas are checked the same way either way.",
    )
    max_pattern_chars: PositiveInt = Field(
        512, description="Longest regex, as a grammar or a schema's `pattern`."
    )
    max_schema_bytes: PositiveInt = Field(
        32_768,
        description="Largest JSON schema (as JSON), of `response_format` or `parameters.grammar`, "
        "or of one tool's parameters.",
    )
    max_schema_depth: PositiveInt = Field(
        16, description="Deepest nesting of objects and arrays in one such schema."
    )
    check_timeout_s: PositiveFloat = Field(
        0.5,
        description="A pattern whose state machine the router cannot build within this (in a "
        "worker process of its own) is refused before any engine sees it.",
    )


class TierTuning(_Strict):
    """How a tier's replicas take requests and how routers reach its engines."""

    cpus_per_replica: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="CPUs each replica reserves from Ray: a reservation for placement, not a "
        "limit on what the engine uses.",
    )
    data_path: Literal["direct", "relay"] = Field(
        "direct",
        description="How answers reach the router: `direct` streams them from the engine the "
        "chosen replica leases (HTTP, the engine's own API key); `relay` passes every chunk "
        "through the replica (Ray's streaming calls), for engines the router cannot reach.",
    )
    lease_reuse_s: NonNegativeFloat = Field(
        2.0,
        description="Direct data path: how long after a replica leased its engine a router may "
        "send further requests on that lease, one at a time, skipping a Ray call each way "
        "(0: every request takes its own lease). Not for tiers with `routing`, nor with tracing.",
    )
    lease_idle_s: NonNegativeFloat = Field(
        1.0,
        description="Direct data path: how long a router keeps a finished request's lease for "
        "the next request of the tier before giving it back (0: at once). A kept lease holds "
        "one of its replica's `max_ongoing_requests` slots; a replica whose every slot is "
        "leased takes its kept leases back at once.",
    )
    lease_spare_s: NonNegativeFloat = Field(
        30.0,
        description="Direct data path: for this long after a router's last request of the "
        "tier, the router keeps one lease in hand (renewed before it is `lease_reuse_s` old), "
        "so that a request after a pause skips the Ray call too (0: none). It holds one "
        "replica slot per router. Not for tiers that may scale to zero (`replicas.min: 0`): "
        "renewing it would wake them.",
    )
    max_ongoing_requests: PositiveInt = Field(
        64, description="Requests one replica takes at once; more wait in Serve's queue."
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description="Requests that may wait in Serve for a replica; past this, requests are "
        "refused at once with 429 and Retry-After (-1: no bound).",
    )
    overflow_at_in_flight: PositiveInt = Field(
        32,
        description="When the tier counts as saturated for `overflow_tier`: this many of its "
        "requests in flight in one router replica.",
    )
    max_start_attempts: PositiveInt = Field(
        3,
        description="Replica starts that may fail in a row before the deployment is reported "
        "as failed, instead of restarting a broken engine forever.",
    )
    grammar: GrammarPolicy = Field(
        GrammarPolicy(), description="What grammars the tier's engine is given to compile."
    )
    gpu_hour_price_usd: NonNegativeFloat | None = Field(
        None,
        description="What one of this tier's GPUs costs per hour, for the cost rules (exported "
        "as serve_app_gpu_hour_price_usd); unset: no dollar figures for the tier.",
    )
    require_max_tokens: bool = Field(
        False,
        description="Refuse requests that do not set `max_tokens` (`max_new_tokens` on TGI's "
        "routes) with a 400/422, instead of giving them default_max_tokens: a guard against "
        "runaway generations billed to a team.",
    )


class RollbackRule(_Strict):
    """When routers send a candidate's traffic back to the stable version on their own."""

    window_s: PositiveFloat = Field(
        60.0, description="The candidate's requests of this last stretch of time are judged."
    )
    min_requests: PositiveInt = Field(
        20, description="Fewest requests in the window before it is judged at all."
    )
    max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of the window's requests that may fail on the server's side (5xx, "
        "engine errors; not a client's 4xx) before the candidate is rolled back.",
    )
    max_p99_s: PositiveFloat | None = Field(
        10.0,
        description="Slowest p99 of the window's request durations (whole answers: to their "
        "end; streams: to their first token) before the candidate is rolled back; unset: not "
        "judged.",
    )


class CandidateVersion(_Strict):
    """A second version of a tier beside its stable one: its own Serve application, sent a
    share of the tier's sessions (canary) and copies of its requests (shadow)."""

    version: str = Field(
        description="The candidate's name (a-z, 0-9, '.', '-', at most 20); its application is "
        "`tier-<name>@<version>`."
    )
    engine: EngineConfig | None = Field(
        None, description="The candidate's engine and model; the tier's own `engine` when unset."
    )
    weight_percent: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Share of the tier's sessions sent to the candidate (canary), by a stable "
        "hash of the session (`x-session-id`, else the OpenAI `user`, else the API key).",
    )
    shadow_percent: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Share of the stable version's requests also sent to the candidate in the "
        "background (shadow): answers discarded and compared, never billed, never waited for.",
    )
    replicas: ReplicaBounds = Field(ReplicaBounds(), description="The candidate's replicas.")
    rollback: RollbackRule = Field(
        RollbackRule(), description="When routers roll the candidate back by themselves."
    )

    @model_validator(mode="after")
    def _named(self) -> CandidateVersion:
        if not VERSION_NAME.match(self.version):
            raise ValueError(
                f"version {self.version!r} must be a-z, 0-9, '.' or '-' (at most 20 characters)"
            )
        return self


class TierConfig(_Tuned):
    """One model tier: its own Serve deployment whose replicas each supervise one engine."""

    name: str = Field(description="Lower-case DNS label; also the Serve deployment's suffix.")
    aliases: tuple[str, ...] = Field((), description="Further model names that select this tier.")
    engine: EngineConfig = Field(
        EngineConfig(), description="The engine each replica launches and supervises."
    )
    gpus_per_replica: Annotated[int, Field(ge=0)] = Field(
        0, description="GPUs each replica reserves from Ray; the engine shards over exactly these."
    )
    default_max_tokens: PositiveInt = Field(
        256, description="Tokens generated for a request that does not say how many."
    )
    max_tokens_limit: PositiveInt = Field(
        1024, description="Largest max_tokens a client may ask for; larger asks are a 400."
    )
    request_timeout_s: PositiveFloat = Field(
        300.0,
        description="The longest one request may take once a replica has taken it, to its last "
        "token; a stream still running then ends with an error event.",
    )
    replica_wait_timeout_s: PositiveFloat = Field(
        600.0,
        description="How long a request may wait for a replica of the tier to take it (the tier "
        "is starting from zero replicas, or saturated) before a 503 with Retry-After.",
    )
    overflow_tier: str | None = Field(
        None,
        description="Where requests for this tier go while it is saturated (spill-over; see "
        "tuning.overflow_at_in_flight).",
    )
    routing: ReplicaRouting | None = Field(
        None,
        description="Route on engine load (and optionally prompt prefixes) instead of Serve's "
        "default choice of replica.",
    )
    admission: TierAdmission | None = Field(
        None, description="Queue requests in the router by priority and tenant (off when unset)."
    )
    replicas: ReplicaBounds = Field(
        ReplicaBounds(),
        description="Fixed when min equals max; otherwise the tier scales between them.",
    )
    scaling: QueueScaling = Field(
        QueueScaling(), description="Used when replicas.min < replicas.max."
    )
    ray_resources: dict[str, float] = Field(
        {},
        description="Custom Ray resources each replica needs, e.g. {tier_large: 1}, to pin a "
        "tier to the nodes (KubeRay worker group) meant for it.",
    )
    tuning: TierTuning = Field(
        TierTuning(),
        description="Replica concurrency and queues, engine leases, spill-over threshold, start "
        "attempts.",
    )
    version: str | None = Field(
        None,
        description="The stable version's name (a-z, 0-9, '.', '-', at most 20); its "
        "application is then `tier-<name>@<version>` (else `tier-<name>`).",
    )
    candidate: CandidateVersion | None = Field(
        None,
        description="Promote it by making its `version` and `engine` the tier's own and "
        'removing this (docs/operations.md, "Versions: canary, shadow, rollback, promote").',
    )

    @model_validator(mode="after")
    def _coherent(self) -> TierConfig:
        if not TIER_NAME.match(self.name):
            raise ValueError(
                f"name {self.name!r} must be a lower-case DNS label (a-z, 0-9, '-', at most 40)"
            )
        if self.version is not None and not VERSION_NAME.match(self.version):
            raise ValueError(
                f"version {self.version!r} must be a-z, 0-9, '.' or '-' (at most 20 characters)"
            )
        if self.candidate is not None:
            if self.candidate.version == self.version_label:
                raise ValueError(
                    f"candidate.version {self.candidate.version!r} must differ from the "
                    "stable version's"
                )
            self.candidate_tier()  # its engine must fit the tier's token limits
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        room = self.engine.max_total_tokens - 1
        if self.max_tokens_limit > room:
            raise ValueError(
                f"max_tokens_limit ({self.max_tokens_limit}) must be below the engine's "
                f"max_total_tokens ({self.engine.max_total_tokens})"
            )
        if self.engine.launcher == "tgi" and self.gpus_per_replica == 0:
            raise ValueError("a 'tgi' engine needs gpus_per_replica >= 1")
        return self

    @property
    def keeps_leases(self) -> bool:
        """Whether routers keep this tier's engine leases between requests
        (`serve_app.router.leases`): a kept lease skips the replica choice."""
        tuning = self.tuning
        return (
            tuning.data_path == "direct"
            and self.routing is None
            and tuning.lease_reuse_s > 0
            and tuning.lease_idle_s > 0
        )

    @property
    def keeps_spare_lease(self) -> bool:
        """Whether routers keep one lease of this tier through pauses (`lease_spare_s`)."""
        return self.keeps_leases and self.tuning.lease_spare_s > 0 and self.replicas.min > 0

    @property
    def version_label(self) -> str:
        """The stable version's name, as metrics and answers give it."""
        return self.version or STABLE

    def candidate_tier(self) -> TierConfig:
        """The candidate as a tier of its own: the tier as it will be once the candidate is
        promoted (its version and engine, no candidate), on the candidate's replicas. Its
        application's args are thus those of the promoted tier: promoting restarts nothing."""
        candidate = self.candidate
        assert candidate is not None
        data = self.model_dump(mode="json", exclude_unset=True)
        data.pop("candidate", None)
        data["version"] = candidate.version
        if candidate.engine is not None:
            data["engine"] = candidate.engine.model_dump(mode="json", exclude_unset=True)
        data["replicas"] = candidate.replicas.model_dump(mode="json")
        try:
            return TierConfig.model_validate(data)
        except ValidationError as exc:
            why = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(f"candidate {candidate.version!r}: {why}") from None

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every `model` value that selects this tier, canonical name first."""
        return (self.name, *self.aliases)

    @classmethod
    def from_engine_settings(cls, data: dict[str, Any]) -> TierConfig:
        """The tier its replicas are built from when it is its own Serve application: its
        `engine_settings`, every live setting at a neutral value (the replicas read none)."""
        live = without_paths(data, TIER_LIVE)
        if live != data:
            raise ValueError("a tier application's args hold only settings that shape its engine")
        return cls.model_validate({**data, **_NEUTRAL_TOKENS})

    def for_replicas(self) -> TierConfig:
        """This tier without the settings only the builder reads (how many replicas, how many
        start attempts). Replicas are built from this, so that scaling a tier is a light update
        of the deployment, not a restart of every replica and of the router."""
        return _defaults_at(self, BUILDER_ONLY)


# Dotted paths within a tier: the settings `TierConfig.for_replicas` resets to their defaults.
BUILDER_ONLY = ("replicas", "scaling", "ray_resources", "tuning.max_start_attempts")

# Dotted paths within a tier: the settings applied live when the tier is its own Serve
# application (`serve_app.serve_config`): the routers take them through their `user_config`, the
# tier's replicas (scaling rule, GPU price) through theirs, Serve its replica bounds. Changing
# them restarts no replica and no engine. Every other tier setting shapes the tier's replicas
# and engine: a change restarts that tier's replicas (and only them).
TIER_LIVE = (
    "aliases",
    "candidate",
    "default_max_tokens",
    "max_tokens_limit",
    "replica_wait_timeout_s",
    "overflow_tier",
    "admission",
    "replicas",
    "scaling",
    "tuning.overflow_at_in_flight",
    "tuning.lease_spare_s",
    "tuning.grammar",
    "tuning.gpu_hour_price_usd",
    "tuning.require_max_tokens",
)
# What a tier's engine-shaping settings are validated with, in place of its token limits (which
# only routers read, and which must fit the engine's `max_total_tokens`).
_NEUTRAL_TOKENS = {"default_max_tokens": 1, "max_tokens_limit": 1}


def without_paths(data: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """`data` (a model's dump) without the settings at `paths` (dotted)."""
    out = dict(data)
    for path in paths:
        head, _, rest = path.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = without_paths(out[head], (rest,))
            if not out[head]:
                del out[head]
        elif not rest:
            out.pop(head, None)
    return out


def engine_settings(tier: TierConfig) -> dict[str, Any]:
    """A tier's settings that shape its replicas and engine (not `TIER_LIVE`), as the args of
    its own Serve application; `TierConfig.from_engine_settings` reads them back."""
    return without_paths(tier.model_dump(mode="json", exclude_unset=True), TIER_LIVE)


def _defaults_at(model: M, paths: tuple[str, ...]) -> M:
    """`model` with the settings at `paths` (dotted, within it) back at their defaults."""
    update: dict[str, Any] = {}
    nested: dict[str, list[str]] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, []).append(rest)
        else:
            update[head] = type(model).model_fields[head].default
    for head, rests in nested.items():
        update[head] = _defaults_at(getattr(model, head), tuple(rests))
    return model.model_copy(update=update)


AUTO_MODEL = "auto"


class AutoRule(_Strict):
    """One rule of the `auto` model: the first rule whose every condition holds picks `tier`."""

    tier: str = Field(description="The tier this rule picks.")
    min_prompt_chars: PositiveInt | None = Field(
        None, description="The prompt (all message contents) is at least this long."
    )
    min_max_tokens: PositiveInt | None = Field(
        None, description="The client asks for at least this many tokens."
    )
    header: str | None = Field(None, description="This request header is present ...")
    header_value: str | None = Field(None, description="... and, if set, has this value.")

    @model_validator(mode="after")
    def _has_condition(self) -> AutoRule:
        if self.min_prompt_chars is None and self.min_max_tokens is None and self.header is None:
            raise ValueError("a rule needs min_prompt_chars, min_max_tokens or header")
        if self.header_value is not None and self.header is None:
            raise ValueError("header_value needs header")
        return self


class ApiKeysTuning(_Strict):
    """How often the keys file is read; how long the quota ledger and prompt counting may take."""

    reload_interval_s: float = Field(
        10,
        gt=0,
        le=60,
        description="How often the router looks at `file` for a change.",
    )
    ledger_timeout_s: PositiveFloat = Field(
        1.0, description="How long admission waits for the quota ledger before it counts as failed."
    )
    tokenize_timeout_s: PositiveFloat = Field(
        2.0,
        description="How long the tier's engine may take to count a prompt's tokens for a key "
        "with a token quota; past it the prompt's characters are reserved instead.",
    )


class ApiKeysConfig(_Tuned):
    """Where the router reads its API keys (see `serve_app.router.auth` for the format)."""

    env: str | None = Field("SERVE_APP_API_KEYS", description="Environment variable holding them.")
    file: str | None = Field(
        None,
        description="A file holding them (takes precedence); re-read when it changes, so that "
        "an added, rotated or revoked key takes effect without a restart.",
    )
    on_ledger_failure: Literal["allow", "deny"] = Field(
        "deny",
        description="What a request of a key with quotas gets while the quota ledger does not "
        "answer: 'deny' (503 with Retry-After) or 'allow' (admitted, not counted). Keys without "
        "quotas never wait on the ledger.",
    )
    tuning: ApiKeysTuning = Field(
        ApiKeysTuning(),
        description="How often the keys file is read; time bounds of the quota ledger and of "
        "prompt counting.",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lease_fraction" in data:
            raise ValueError("`lease_fraction` is no longer used: remove it")
        return data

    @model_validator(mode="after")
    def _has_source(self) -> ApiKeysConfig:
        if self.env is None and self.file is None:
            raise ValueError("api_keys needs env or file")
        return self


class RouterTuning(_Strict):
    """The router's limits on what a request may be, and TGI compatibility."""

    max_body_bytes: PositiveInt = Field(
        2_000_000, description="Larger bodies are a 413, chunked ones included (read no further)."
    )
    body_bytes_per_input_token: PositiveInt = Field(
        32,
        description="A body is also a 413 above this many bytes per input token of the largest "
        "`max_input_tokens` among the tiers the caller may use (plus 64 KiB), before it is "
        "parsed: what no tier could take is never parsed.",
    )
    body_timeout_s: PositiveFloat = Field(
        30.0, description="The whole body must arrive within this (else 408)."
    )
    max_header_bytes: PositiveInt = Field(
        16_384, description="Request headers (names and values) above this are a 431."
    )
    max_json_depth: PositiveInt = Field(
        64, description="Deeper nesting of arrays and objects in a body is a 400."
    )
    max_messages: PositiveInt = Field(
        1_000, description="Chat requests with more messages are a 400."
    )
    max_tools: PositiveInt = Field(128, description="Chat requests with more tools are a 400.")
    max_stop_chars: PositiveInt = Field(
        256,
        description="Longest stop sequence, on every route (the engine only ever matches the "
        "last few hundred characters of the text).",
    )
    tgi_any_tier_name: bool = Field(
        True,
        description="On TGI's routes, an unknown X-Tier goes to fallback_tier (else default_tier), "
        "as TGI answers whatever model name it is sent.",
    )


class RouterConfig(_Tuned):
    """The HTTP entry point: which tier a request goes to, API keys, router replicas."""

    default_tier: str | None = Field(
        None,
        description="Tier for TGI-native routes without an X-Tier header, and for the `auto` "
        "model when no rule matches; the first tier when unset.",
    )
    auto_rules: tuple[AutoRule, ...] = Field(
        (), description="How model `auto` picks a tier; the first matching rule wins."
    )
    api_keys: ApiKeysConfig | None = Field(
        None, description="Require API keys (with per-key tiers and quotas); off when unset."
    )
    fallback_tier: str | None = Field(
        None,
        description="Tier for model names no tier answers to on the OpenAI routes (TGI's "
        "clients send placeholder names such as 'tgi' or 'dummy'); unset: 404 model_not_found.",
    )
    replicas: PositiveInt = Field(
        1, description="Router replicas; each holds its own admission queues and leases."
    )
    ray_resources: dict[str, float] = Field(
        {},
        description="Custom Ray resources each router replica needs, e.g. {serve_app_router: 1}, "
        "to pin the router to the nodes (KubeRay worker group) that hold the API keys.",
    )
    tuning: RouterTuning = Field(
        RouterTuning(), description="Limits on a request's size and shape; TGI compatibility."
    )


class TracingConfig(_Strict):
    """OpenTelemetry traces from the router, the tier replicas and the engines (see
    `serve_app.tracing`); needs the `tracing` extra."""

    otlp_endpoint: str = Field(
        pattern=r"^https?://[^/\s]+/?$",
        description="OTLP/gRPC collector, e.g. http://otel-collector:4317; also given to each "
        "engine as --otlp-endpoint, so that its spans join the same traces.",
    )
    service_name: str = Field(
        "serve-app",
        min_length=1,
        description="service.name of the router and tiers; engines report as "
        "'<service_name>-engine' (--otlp-service-name).",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded; a request that arrives with a sampled "
        "`traceparent` is always recorded.",
    )


# A Kubernetes resource quantity: cores ("8", "500m") or bytes ("64Gi", "512M").
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|[KMGTPE]i|[MGTPE])?$")]
Placement = Literal["preferred", "required", "off"]


class Toleration(_Strict):
    """A node taint the pods tolerate (a Kubernetes toleration)."""

    key: str | None = Field(None, description="The taint's key; unset with `Exists`: every taint.")
    operator: Literal["Equal", "Exists"] = Field(
        "Equal", description="`Equal`: the taint's value must be `value`; `Exists`: any value."
    )
    value: str | None = Field(None, description="The taint's value, with `Equal`.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="The taint's effect; unset: every effect."
    )


class PodSettings(_Strict):
    """One kind of Ray pod on Kubernetes: its size and where it may run. What is unset is
    derived (docs/kubernetes.md, "Pod sizes")."""

    cpu: Quantity | None = Field(
        None, description="CPU request and limit (e.g. `8`, `500m`); derived when unset."
    )
    memory: Quantity | None = Field(
        None, description="Memory request and limit (e.g. `64Gi`); derived when unset."
    )
    node_selector: dict[str, str] = Field(
        {}, description="Node labels the pods require, beside those the overlay adds."
    )
    tolerations: tuple[Toleration, ...] = Field(
        (), description="Taints the pods tolerate, beside the GPU taint GPU pods always tolerate."
    )
    priority_class: str | None = Field(
        None,
        description="The pods' PriorityClass (`priorityClassName`); the cluster's default "
        "when unset.",
    )


class GroupPodSettings(PodSettings):
    """A worker group's pods: size, placement, and how many a node drain may take at once."""

    max_unavailable: Annotated[int, Field(ge=0)] = Field(
        1,
        description="The group's PodDisruptionBudget: pods a voluntary disruption (a node "
        "drain) may take at once; 0: none, a drain waits until the group's pods are idle and "
        'removed (docs/operations.md, "Draining a node").',
    )


class TierPodSettings(GroupPodSettings):
    """A tier's worker group: one pod per replica, with the tier's `gpus_per_replica` GPUs."""

    tier: str = Field(description="The tier (its `name`) these settings are for.")
    accelerator: str | None = Field(
        None,
        description="The GPU model the tier's nodes must have: the value of "
        "`kubernetes.accelerator_label` (e.g. `NVIDIA-H100-80GB-HBM3`); any GPU when unset.",
    )


class TopologySpread(_Strict):
    """How each worker group's pods spread over nodes and zones (topologySpreadConstraints)."""

    nodes: Placement = Field(
        "preferred",
        description="Across nodes (`kubernetes.io/hostname`): `preferred` (ScheduleAnyway), "
        "`required` (DoNotSchedule) or `off`.",
    )
    zones: Placement = Field(
        "preferred",
        description="Across zones (`topology.kubernetes.io/zone`); `required` leaves pods "
        "pending on nodes without a zone label.",
    )


class KubernetesConfig(_Strict):
    """How `python -m serve_app.kuberay render` lays the application out on a KubeRay cluster.
    The application never reads this section: the rendered `serveConfigV2` leaves it out."""

    head: PodSettings = Field(PodSettings(), description="The head pod (GCS, dashboard, Serve "
                              "controller).")  # fmt: skip
    router: GroupPodSettings = Field(
        GroupPodSettings(), description="The router group's pods, one per router replica."
    )
    tiers: tuple[TierPodSettings, ...] = Field(
        (), description="Per tier, by name; a tier not listed gets the derived defaults."
    )
    accelerator_label: str = Field(
        "nvidia.com/gpu.product",
        description="The node label that names a node's GPU model (NVIDIA's GPU feature "
        "discovery sets this one; GKE: `cloud.google.com/gke-accelerator`).",
    )
    spread: TopologySpread = Field(
        TopologySpread(), description="How worker groups spread over nodes and zones."
    )

    def tier(self, name: str) -> TierPodSettings:
        """The settings for tier `name` (defaults where it is not listed)."""
        return next((t for t in self.tiers if t.tier == name), TierPodSettings(tier=name))


class AppConfig(_Strict):
    """The `args` of the application in a Serve config file."""

    tiers: tuple[TierConfig, ...] = Field(
        min_length=1,
        description="The model tiers, at least one; a request's `model` (a tier's name or one of "
        "its aliases) picks one.",
    )
    router: RouterConfig = Field(
        RouterConfig(), description="Every request comes in through the router's replicas."
    )
    tracing: TracingConfig | None = Field(None, description="Off when unset.")
    kubernetes: KubernetesConfig = Field(
        KubernetesConfig(),
        description="Pod sizes and placement, disruption budgets and spread (docs/kubernetes.md).",
    )

    @model_validator(mode="after")
    def _names_unique(self) -> AppConfig:
        owner: dict[str, str] = {}
        for tier in self.tiers:
            for model_name in tier.model_names:
                if model_name in owner:
                    raise ValueError(
                        f"model name {model_name!r} is used by tiers {owner[model_name]!r} "
                        f"and {tier.name!r}"
                    )
                owner[model_name] = tier.name
        if AUTO_MODEL in owner:
            raise ValueError(f"model name {AUTO_MODEL!r} is reserved for tier choice by rules")
        names = {t.name for t in self.tiers}
        default = self.router.default_tier
        if default is not None and default not in names:
            raise ValueError(f"router.default_tier {default!r} is not one of the tiers")
        fallback = self.router.fallback_tier
        if fallback is not None and fallback not in names:
            raise ValueError(f"router.fallback_tier {fallback!r} is not one of the tiers")
        for i, rule in enumerate(self.router.auto_rules):
            if rule.tier not in names:
                raise ValueError(
                    f"router.auto_rules[{i}].tier {rule.tier!r} is not one of the tiers"
                )
        for tier in self.tiers:
            if tier.overflow_tier is not None and tier.overflow_tier not in names - {tier.name}:
                raise ValueError(
                    f"tier {tier.name!r}: overflow_tier {tier.overflow_tier!r} must be another tier"
                )
        return self

    @model_validator(mode="after")
    def _kubernetes_tiers_known(self) -> AppConfig:
        names = {t.name for t in self.tiers}
        listed = [t.tier for t in self.kubernetes.tiers]
        for name in listed:
            if name not in names:
                raise ValueError(f"kubernetes.tiers: {name!r} is not one of the tiers")
        if len(set(listed)) != len(listed):
            raise ValueError("kubernetes.tiers: a tier is listed twice")
        return self

    def for_replicas(self) -> AppConfig:
        return self.model_copy(update={"tiers": tuple(t.for_replicas() for t in self.tiers)})

    def for_router(self) -> AppConfig:
        """What the router replicas are built from: `for_replicas`, and no spare lease for a
        tier that may scale to zero (`replicas` is not in it, and a renewal would wake the
        tier). Only a change to or from `replicas.min: 0` thus restarts the routers."""
        tiers = tuple(
            t.for_replicas() if t.keeps_spare_lease else _no_spare_lease(t.for_replicas())
            for t in self.tiers
        )
        return self.model_copy(update={"tiers": tiers})

    @property
    def default_tier(self) -> str:
        return self.router.default_tier or self.tiers[0].name

    def tier(self, name: str) -> TierConfig:
        return next(t for t in self.tiers if t.name == name)


def _no_spare_lease(tier: TierConfig) -> TierConfig:
    return tier.model_copy(update={"tuning": tier.tuning.model_copy(update={"lease_spare_s": 0.0})})
