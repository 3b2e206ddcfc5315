"""Replica choice as pure functions over replica states: expected wait, ranking, affinity."""

from __future__ import annotations

import pytest

from serve_app.app import tier_deployment
from serve_app.config import ReplicaRouting, RoutingTuning, TierConfig
from serve_app.engine.stats import parse_load
from serve_app.tier.replica_choice import (
    Assignment,
    EngineState,
    ReplicaView,
    RouteHint,
    expected_wait,
    prompt_text,
    rank_replicas,
    route_hint,
)

# One generated token takes 10 ms; prefill is free, so work = output tokens * 10 ms.
R = ReplicaRouting(
    tuning=RoutingTuning(token_time_s=0.01, prefill_token_fraction=0.0, affinity_margin_s=0.5)
)
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


def test_other_routers_share_of_the_reported_load_counts_with_the_average_work() -> None:
    # this router holds one 40-token request; the engine reports 3 in flight. With two
    # routers, half of those (rounded: 2) are the other's: average work (0.4 s) from now,
    # filling the second slot and queueing one more.
    crowded = view("a", 40, running=2, queued=1)
    assert expected_wait(crowded, NOW, R, routers=2) == pytest.approx(0.4)


def test_with_one_router_a_stale_report_does_not_count() -> None:
    # the engine still reports requests that have since finished: only what this router
    # holds counts, or a replica that just emptied would look busy
    assert expected_wait(view("a", 40, running=2, queued=3), NOW, R) == 0.0


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


def seen(v: ReplicaView, *keys: str) -> ReplicaView:
    return ReplicaView(v.replica_id, v.engine, v.assigned, frozenset(keys))


def test_a_key_stays_on_the_replica_that_has_seen_it_within_the_margin() -> None:
    hint = RouteHint(1, 10, key="k1")  # no prefill cost: only the margin keeps it home
    # home slightly busier (0.3 s < margin 0.5 s): still first
    views = [seen(view("a", 30, 100), "k1"), view("b"), view("c")]
    assert rank_replicas(views, hint, NOW, R)[0] == "a"
    # home much busier (2 s): the cheapest replica wins
    views = [seen(view("a", 200, 300), "k1"), view("b"), view("c")]
    assert rank_replicas(views, hint, NOW, R)[0] != "a"


def test_a_cached_prefix_saves_its_prefill_in_the_cost() -> None:
    routing = ReplicaRouting(
        tuning=RoutingTuning(token_time_s=0.01, prefill_token_fraction=0.1, affinity_margin_s=0)
    )
    hint = RouteHint(1000, 10, key="sys")  # prefill: 1000 * 0.1 * 10 ms = 1 s
    views = [seen(view("a", 50, 60), "sys"), view("b")]  # a: 0.5 s wait, b: idle
    assert rank_replicas(views, hint, NOW, routing) == ["a", "b"]
    assert rank_replicas(views, RouteHint(1000, 10, key="other"), NOW, routing) == ["b", "a"]


def test_a_request_with_its_prefix_cached_counts_no_prefill_in_the_wait() -> None:
    routing = ReplicaRouting(tuning=RoutingTuning(token_time_s=0.01, prefill_token_fraction=0.1))
    cold = ReplicaView("a", EngineState(slots=1), (Assignment(NOW, 1000, 10),))
    warm = ReplicaView("a", EngineState(slots=1), (Assignment(NOW, 1000, 10, cached=True),))
    assert expected_wait(cold, NOW, routing) == pytest.approx(1.1)
    assert expected_wait(warm, NOW, routing) == pytest.approx(0.1)


def test_a_pinned_session_has_its_own_larger_margin() -> None:
    views = [seen(view("a", 150, 300), "s"), view("b")]  # home 1.5 s behind
    assert rank_replicas(views, RouteHint(1, 10, key="s", pinned=True), NOW, R)[0] == "a"
    assert rank_replicas(views, RouteHint(1, 10, key="s"), NOW, R)[0] == "b"


def test_a_key_seen_nowhere_goes_by_cost_alone() -> None:
    views = [view("a", 10), view("b"), view("c", 10)]
    assert rank_replicas(views, RouteHint(1, 10, key="new"), NOW, R)[0] == "b"
    spread = {rank_replicas([view("a"), view("b")], RouteHint(1, 1, key=f"k{i}"), NOW, R)[0]
              for i in range(20)}  # fmt: skip
    assert spread == {"a", "b"}


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
    routing = ReplicaRouting(prefix_affinity=True, tuning=RoutingTuning(prefix_chars=8))
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
    routing = ReplicaRouting(prefix_affinity=True, tuning=RoutingTuning(stats_period_s=0.25))
    routed = TierConfig(name="t", routing=routing)
    assert tier_deployment(
        plain
    )._deployment_config.request_router_config.is_default_request_router()
    config = tier_deployment(routed)._deployment_config.request_router_config
    assert config.request_router_class == "serve_app.tier.request_router:EngineAwareRouter"
    assert config.request_router_kwargs["routers"] == 1
    assert config.request_routing_stats_period_s == 0.25
    assert ReplicaRouting.model_validate(config.request_router_kwargs["routing"]) == routed.routing
    assert (
        tier_deployment(routed, 3)._deployment_config.request_router_config.request_router_kwargs[
            "routers"
        ]
        == 3
    )
