"""Serve's request router for tiers with `routing` set: a thin shell over `replica_choice`.

Serve runs one instance per deployment handle (in each router replica). It keeps what this
handle sent to each replica until Serve reports it finished, reads every replica's published
engine state (`RunningReplica.routing_stats`), and ranks replicas with `rank_replicas`; Serve
then tries them in that order (each rank holds one replica), skipping any that is full.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.serve.context import _get_serve_request_context
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..config import ReplicaRouting
from .replica_choice import Assignment, EngineState, ReplicaView, RouteHint, rank_replicas


class EngineAwareRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        """`kwargs` are the tier's `ReplicaRouting`, as `request_router_kwargs`."""
        self._routing = ReplicaRouting.model_validate(kwargs)
        self._clock: Callable[[], float] = time.monotonic
        # replica id -> internal request id -> the requests (a retry reuses the id)
        self._assigned: dict[str, dict[str, list[Assignment]]] = {}

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
            )
            for rid, replica in by_id.items()
        ]
        ranked = rank_replicas(views, _hint(pending_request), self._clock(), self._routing)
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        hint = _hint(pending_request) or RouteHint(1, 1)
        held = self._assigned.setdefault(replica_id.unique_id, {})
        held.setdefault(pending_request.metadata.internal_request_id, []).append(
            Assignment(self._clock(), hint.prompt_tokens, hint.output_tokens)
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


def _hint(pending_request: PendingRequest | None) -> RouteHint | None:
    if pending_request is None:
        return None
    return RouteHint.decode(pending_request.metadata.session_id)


def session_header() -> str | None:
    """The calling request's `x-session-id` header: Serve's proxy reads it into the request
    context (`RAY_SERVE_SESSION_ID_HEADER_KEY` renames it)."""
    return _get_serve_request_context().session_id or None
