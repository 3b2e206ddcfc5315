"""Serve's request router for tiers with `routing` set: a thin shell over `replica_choice`.

Serve runs one instance per deployment handle (in each router replica). It keeps what this
handle sent to each replica until Serve reports it finished, remembers which affinity keys it
sent where, reads every replica's published engine state (`RunningReplica.routing_stats`), and
ranks replicas with `rank_replicas`; Serve then tries them in that order (each rank holds one
replica), skipping any that is full.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ray.serve.context import _get_serve_request_context
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..config import ReplicaRouting
from .replica_choice import Assignment, EngineState, ReplicaView, RouteHint, rank_replicas


class EngineAwareRouter(RequestRouter):
    def initialize_state(self, *, routing: dict[str, Any], routers: int) -> None:
        """From `request_router_kwargs`: the tier's `ReplicaRouting`, and how many router
        replicas share the tier's replicas."""
        self._routing = ReplicaRouting.model_validate(routing)
        self._routers = routers
        self._clock: Callable[[], float] = time.monotonic
        # replica id -> internal request id -> the requests (a retry reuses the id)
        self._assigned: dict[str, dict[str, list[Assignment]]] = {}
        # replica id -> keys of requests recently sent there, oldest first
        self._prefixes: dict[str, OrderedDict[str, None]] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        views = [
            ReplicaView(
                rid,
                EngineState.from_stats(replica.routing_stats or {}),
                tuple(a for held in self._assigned.get(rid, {}).values() for a in held),
                frozenset(self._prefixes.get(rid, ())),
            )
            for rid, replica in by_id.items()
        ]
        hint = _hint(pending_request)
        ranked = rank_replicas(views, hint, self._clock(), self._routing, self._routers)
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        hint = _hint(pending_request) or RouteHint(1, 1)
        rid = replica_id.unique_id
        seen = self._prefixes.setdefault(rid, OrderedDict())
        cached = bool(hint.key) and hint.key in seen
        if hint.key:
            seen[hint.key] = None
            seen.move_to_end(hint.key)
            if len(seen) > self._routing.tuning.prefix_view_size:
                seen.popitem(last=False)
        held = self._assigned.setdefault(rid, {})
        held.setdefault(pending_request.metadata.internal_request_id, []).append(
            Assignment(self._clock(), hint.prompt_tokens, hint.output_tokens, cached)
        )

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        held = self._assigned.get(replica_id.unique_id, {})
        requests = held.get(internal_request_id)
        if requests:
            requests.pop(0)
            if not requests:
                del held[internal_request_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._assigned.pop(replica_id.unique_id, None)
        self._prefixes.pop(replica_id.unique_id, None)


def _hint(pending_request: PendingRequest | None) -> RouteHint | None:
    if pending_request is None:
        return None
    return RouteHint.decode(pending_request.metadata.session_id)


def session_header() -> str | None:
    """The calling request's `x-session-id` header: Serve's proxy reads it into the request
    context (`RAY_SERVE_SESSION_ID_HEADER_KEY` renames it)."""
    return _get_serve_request_context().session_id or None
