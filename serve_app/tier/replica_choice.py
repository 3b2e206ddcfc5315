"""Which replica of a tier takes a request: the one with the lowest expected wait, or the one
that already holds the request's prefix when that costs little more.

The router knows what it sent where (each request's prompt and asked tokens, and when), and
every replica publishes its engine's queue, running batch, slots and KV pressure a few times a
second. The expected wait of a replica is the time until one of its engine's slots is free for
a new request, found by replaying the requests it holds through its slots in order:

    work(request) = (prompt_tokens * prefill_token_fraction + output_tokens) * token_time_s
    slot_free     = the earliest time a slot frees after every held request has had its turn

With several router replicas, each sees only its own share of an engine's requests: the
others' share of what the engine reports, `reported * (1 - 1/routers)`, counts with the average
work of this router's own. (The report is a fraction of a second old; with one router it is not
used for counts at all, since a stale count would steer requests away from a replica that has
just finished its work.) A replica whose KV cache is past `kv_pressure_limit`
has no free slot until one of its requests ends.

A request's cost on a replica is that wait plus its own prefill, which is nothing where the
replica's prefix cache likely holds it. TGI says nothing about its cache, so the router keeps
its own view: the keys (a hash of the prompt's leading part, or of the `x-session-id`) of the
requests it recently sent to each replica. A request whose key a replica has seen stays with
that replica unless it costs more than the cheapest one by the configured margin; a key seen
nowhere goes by cost alone (so prompts that share nothing are routed as without affinity).

Everything here is a function over values; `serve_app.tier.request_router` is its Serve shell.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ReplicaRouting

CHARS_PER_TOKEN = 4  # prompt tokens are estimated from characters; the engine is not asked
HINT_VERSION = "rh1"


@dataclass(frozen=True)
class EngineState:
    """What a replica publishes about its engine (`TierDeployment.record_routing_stats`)."""

    queued: float = 0.0
    running: float = 0.0
    slots: int = 1
    kv_pressure: float = 0.0

    def as_stats(self) -> dict[str, float]:
        return {
            "queued": self.queued,
            "running": self.running,
            "slots": self.slots,
            "kv_pressure": self.kv_pressure,
        }

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> EngineState | None:
        """None when the replica has published nothing (yet) or something else."""
        try:
            return cls(
                queued=float(stats["queued"]),
                running=float(stats["running"]),
                slots=max(1, int(stats["slots"])),
                kv_pressure=float(stats["kv_pressure"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class RouteHint:
    """What the router tells the replica choice about one request. It travels to the tier's
    request router inside Serve's request metadata (the `session_id` option), as a string."""

    prompt_tokens: int
    output_tokens: int
    key: str = ""  # affinity key: a hash; empty for none
    pinned: bool = False  # the key is a conversation's session id, not a prefix

    def encode(self) -> str:
        fields = (HINT_VERSION, self.prompt_tokens, self.output_tokens, int(self.pinned), self.key)
        return ":".join(map(str, fields))

    @classmethod
    def decode(cls, text: str) -> RouteHint | None:
        parts = text.split(":", 4)
        if len(parts) != 5 or parts[0] != HINT_VERSION:
            return None
        try:
            return cls(int(parts[1]), int(parts[2]), parts[4], parts[3] == "1")
        except ValueError:
            return None


@dataclass(frozen=True)
class Assignment:
    """A request this router sent to a replica and has not seen finish."""

    sent_at: float
    prompt_tokens: int
    output_tokens: int
    cached: bool = False  # its prefix was in the replica's cache (as far as the router knows)


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    engine: EngineState | None
    assigned: tuple[Assignment, ...] = ()
    prefixes: frozenset[str] = frozenset()  # keys of requests recently sent there


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text a request's prefix key is taken from: a chat's messages in order, or the
    prompt (`prompt` for OpenAI completions, `inputs` for TGI)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(
            f"<{m.get('role')}>{_content(m.get('content'))}"
            for m in messages
            if isinstance(m, dict)
        )
    for field in ("prompt", "inputs"):
        value = body.get(field)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
    return ""


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def asked_tokens(body: Mapping[str, Any], default: int) -> int:
    """The most tokens the request may generate, as the engine will be asked."""
    params = body.get("parameters")
    candidates = (
        body.get("max_completion_tokens"),
        body.get("max_tokens"),
        params.get("max_new_tokens") if isinstance(params, dict) else None,
    )
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def route_hint(
    body: Mapping[str, Any], session: str | None, default_tokens: int, routing: ReplicaRouting
) -> RouteHint:
    text = prompt_text(body)
    prompt_tokens = len(text) // CHARS_PER_TOKEN + 1
    output_tokens = asked_tokens(body, default_tokens)
    if session:
        return RouteHint(prompt_tokens, output_tokens, _digest("session:" + session), True)
    if routing.prefix_affinity and text:
        return RouteHint(prompt_tokens, output_tokens, _digest(text[: routing.tuning.prefix_chars]))
    return RouteHint(prompt_tokens, output_tokens)


def _work_s(prompt_tokens: int, output_tokens: int, routing: ReplicaRouting) -> float:
    cost = routing.tuning
    return (prompt_tokens * cost.prefill_token_fraction + output_tokens) * cost.token_time_s


def expected_wait(
    view: ReplicaView, now: float, routing: ReplicaRouting, routers: int = 1
) -> float:
    """Seconds until the replica's engine can start one more request (see the module doc)."""
    engine = view.engine or EngineState(slots=1)
    free_at = [float("-inf")] * engine.slots  # a heap of the times each slot frees
    works = [
        _work_s(0 if a.cached else a.prompt_tokens, a.output_tokens, routing) for a in view.assigned
    ]
    for assignment, work in sorted(zip(view.assigned, works, strict=True), key=_sent):
        start = max(heapq.heappop(free_at), assignment.sent_at)
        heapq.heappush(free_at, start + work)
    unknown = round((engine.queued + engine.running) * (1 - 1 / routers))
    if unknown:
        mean = sum(works) / len(works) if works else routing.tuning.token_time_s * 64
        for _ in range(unknown):
            heapq.heappush(free_at, max(heapq.heappop(free_at), now) + mean)
    wait = max(0.0, free_at[0] - now)
    if engine.kv_pressure >= routing.tuning.kv_pressure_limit:
        busy = [t for t in free_at if t > now]
        wait = max(wait, min(busy) - now if busy else 0.0)
    return wait


def _sent(pair: tuple[Assignment, float]) -> float:
    return pair[0].sent_at


def rank_replicas(
    views: Sequence[ReplicaView],
    hint: RouteHint | None,
    now: float,
    routing: ReplicaRouting,
    routers: int = 1,
) -> list[str]:
    """Replica ids, cheapest first. Ties go to the replica holding fewer requests, then to a
    per-request hash, so equal replicas share the load."""
    if not views:
        return []
    key = hint.key if hint is not None else ""
    prefill = _work_s(hint.prompt_tokens, 0, routing) if hint is not None else 0.0
    cost = {
        v.replica_id: expected_wait(v, now, routing, routers)
        + (0.0 if key and key in v.prefixes else prefill)
        for v in views
    }
    held = {v.replica_id: len(v.assigned) for v in views}
    spread = key or f"{now!r}"
    order = sorted(
        cost, key=lambda rid: (round(cost[rid], 6), held[rid], _digest(f"{spread}|{rid}"))
    )
    homes = [v.replica_id for v in views if key and key in v.prefixes]
    if homes:
        home = min(homes, key=order.index)
        tuning = routing.tuning
        margin = tuning.session_margin_s if hint and hint.pinned else tuning.affinity_margin_s
        if cost[home] - cost[order[0]] <= margin:
            order.remove(home)
            order.insert(0, home)
    return order
