"""Replica choice as pure functions over replica states: expected wait, ranking, affinity."""

from __future__ import annotations

import pytest

from serve_app.app import tier_deployment
from serve_app.config import ReplicaRouting, TierConfig
from serve_app.engine.stats import parse_load
from serve_app.tier.replica_choice import (
    Assignment,
    EngineState,
    ReplicaView,
    RouteHint,
    expected_wait,
    preferred,
    prompt_text,
    rank_replicas,
    route_hint,
)

# One generated token takes 10 ms; prefill is free, so work = output tokens * 10 ms.
R = ReplicaRouting(token_time_s=0.01, prefill_token_fraction=0.0, affinity_margin_s=0.5)
NOW = 100.0


def view(
    rid: str, *outputs: int, slots: int = 2, sent: float = NOW, **engine: float
) -> ReplicaView:
    held = tuple(Assignment(sent, 1, n) for n in outputs)
    state = EngineState(slots=slots, **engine)  # type: ignore[arg-type]
    return ReplicaView(rid, state, held)


def test_a_free_slot_means_no_wait() -> None:
    assert expected_wait(view("a", 100, slots=2), NOW, R) == 0.0


def test_full_slots_wait_for_the_shortest_running_request() -> None:
    # two slots busy with 100 and 20 tokens: the 20-token one frees first, after 0.2 s
    assert expected_wait(view("a", 100, 20), NOW, R) == pytest.approx(0.2)


def test_queued_requests_take_their_turn_before_a_new_one() -> None:
    # slots: [100, 20] then a queued 50 starts at 0.2 s and ends at 0.7 s; slot 1 frees at 1.0
    assert expected_wait(view("a", 100, 20, 50), NOW, R) == pytest.approx(0.7)


def test_time_already_spent_counts_as_progress() -> None:
    # sent 0.15 s ago: the 20-token request has 0.05 s left
    assert expected_wait(view("a", 100, 20, sent=NOW - 0.15), NOW, R) == pytest.approx(0.05)


def test_requests_from_other_routers_count_with_the_average_work() -> None:
    # this router holds one 40-token request; the engine reports 3 in flight: two unknown
    # ones of the average (0.4 s) start now, filling the second slot and queueing one more.
    alone = expected_wait(view("a", 40), NOW, R)
    crowded = expected_wait(view("a", 40, running=2, queued=1), NOW, R)
    assert alone == 0.0
    assert crowded == pytest.approx(0.4)


def test_kv_pressure_past_the_limit_leaves_no_free_slot() -> None:
    assert expected_wait(view("a", 30, kv_pressure=0.95), NOW, R) == pytest.approx(0.3)
    assert expected_wait(view("a", 30, kv_pressure=0.5), NOW, R) == 0.0


def test_a_replica_without_published_state_counts_as_one_slot() -> None:
    blank = ReplicaView("a", None, (Assignment(NOW, 1, 10),))
    assert expected_wait(blank, NOW, R) == pytest.approx(0.1)


def test_ranking_prefers_the_replica_whose_slot_frees_first_not_the_emptier_one() -> None:
    # "long" holds 2 long generations; "short" holds 3 short ones: by count "long" looks
    # better (Serve's default), by expected wait "short" is (its slot frees in 0.1 s).
    views = [view("long", 500, 500), view("short", 10, 10, 10)]
    assert rank_replicas(views, None, NOW, R) == ["short", "long"]


def test_equal_replicas_tie_break_by_fewer_requests_then_spread() -> None:
    views = [view("a", 10), view("b")]
    assert rank_replicas(views, None, NOW, R)[0] == "b"
    first = {rank_replicas([view("a"), view("b")], None, NOW + i, R)[0] for i in range(20)}
    assert first == {"a", "b"}


def test_affinity_keeps_a_key_on_its_replica_within_the_margin() -> None:
    ids = ["a", "b", "c"]
    hint = RouteHint(10, 10, key="k1")
    home = preferred("k1", ids)
    # home slightly busier (0.3 s < margin 0.5 s): still first
    views = [view(rid, *((30, 100) if rid == home else ())) for rid in ids]
    assert rank_replicas(views, hint, NOW, R)[0] == home
    # home much busier (2 s): the best replica wins
    views = [view(rid, *((200, 300) if rid == home else ())) for rid in ids]
    assert rank_replicas(views, hint, NOW, R)[0] != home


def test_a_pinned_session_has_its_own_larger_margin() -> None:
    ids = ["a", "b"]
    hint = RouteHint(10, 10, key="s", pinned=True)
    home = preferred("s", ids)
    views = [view(rid, *((150, 300) if rid == home else ())) for rid in ids]
    assert rank_replicas(views, hint, NOW, R)[0] == home  # 1.5 s: within session_margin_s
    assert rank_replicas(views, RouteHint(10, 10, key="s"), NOW, R)[0] != home


def test_rendezvous_moves_only_keys_of_a_removed_replica() -> None:
    keys = [f"k{i}" for i in range(200)]
    before = {k: preferred(k, ["a", "b", "c"]) for k in keys}
    after = {k: preferred(k, ["a", "b"]) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "c"}
    assert 30 < len(moved) < 110  # about a third


def test_prompt_text_covers_chat_completion_and_tgi_bodies() -> None:
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    assert prompt_text(chat) == "<system>S<user>U"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(parts) == "<user>hi"
    assert prompt_text({"prompt": "p"}) == "p"
    assert prompt_text({"prompt": ["p1", "p2"]}) == "p1"
    assert prompt_text({"inputs": "x"}) == "x"
    assert prompt_text({"inputs": 3}) == ""


def test_route_hint_keys_on_the_leading_prompt_or_the_session() -> None:
    routing = ReplicaRouting(prefix_affinity=True, prefix_chars=8)
    a = route_hint({"prompt": "SYSTEM: answer A", "max_tokens": 7}, None, 99, routing)
    b = route_hint({"prompt": "SYSTEM: answer B"}, None, 99, routing)
    c = route_hint({"prompt": "OTHER:   answer A"}, None, 99, routing)
    assert a.key == b.key != c.key
    assert (a.output_tokens, b.output_tokens) == (7, 99)
    assert a.prompt_tokens == len("SYSTEM: answer A") // 4 + 1
    tgi = route_hint({"inputs": "x", "parameters": {"max_new_tokens": 5}}, None, 99, routing)
    assert tgi.output_tokens == 5
    s1 = route_hint({"prompt": "turn 1"}, "conv-9", 9, routing)
    s2 = route_hint({"prompt": "turn 2 differs"}, "conv-9", 9, routing)
    assert s1.key == s2.key and s1.pinned
    off = route_hint({"prompt": "SYSTEM: answer A"}, None, 99, ReplicaRouting())
    assert off.key == "" and not off.pinned


def test_hint_survives_its_trip_as_a_string_and_other_strings_are_no_hint() -> None:
    hint = RouteHint(12, 34, "abcdef0123456789", True)
    assert RouteHint.decode(hint.encode()) == hint
    assert RouteHint.decode(RouteHint(1, 2).encode()) == RouteHint(1, 2)
    for other in ("", "user-session-42", "rh1:x:1:0:k", "rh0:1:1:0:k"):
        assert RouteHint.decode(other) is None


def test_published_engine_state_round_trips_and_junk_is_no_state() -> None:
    state = EngineState(queued=2, running=4, slots=4, kv_pressure=0.5)
    assert EngineState.from_stats(state.as_stats()) == state
    assert EngineState.from_stats({}) is None
    assert (
        EngineState.from_stats({"queued": "x", "running": 0, "slots": 1, "kv_pressure": 0}) is None
    )


def test_kv_pressure_is_read_from_tgi_batch_token_gauges() -> None:
    text = (
        "tgi_queue_size 3\ntgi_batch_current_size 2\n"
        "tgi_batch_current_max_tokens 3000\ntgi_batch_max_total_tokens 4000\n"
    )
    load = parse_load(text)
    assert (load.queued, load.running, load.kv_pressure) == (3, 2, 0.75)
    assert parse_load("tgi_queue_size 1\n").kv_pressure == 0.0


def test_a_tier_with_routing_gets_the_engine_aware_request_router() -> None:
    plain = TierConfig(name="t")
    routed = TierConfig(name="t", routing=ReplicaRouting(prefix_affinity=True, stats_period_s=0.25))
    assert tier_deployment(
        plain
    )._deployment_config.request_router_config.is_default_request_router()
    config = tier_deployment(routed)._deployment_config.request_router_config
    assert config.request_router_class == "serve_app.tier.request_router:EngineAwareRouter"
    assert config.request_router_kwargs["prefix_affinity"] is True
    assert config.request_routing_stats_period_s == 0.25
    assert ReplicaRouting.model_validate(config.request_router_kwargs) == routed.routing
