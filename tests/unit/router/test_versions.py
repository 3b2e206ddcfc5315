"""A tier's versions in the router (`serve_app.router.versions`): the canary's split by session,
the rollback window, the shared board, the state a status route shows; and through the router
alone, the served version's header, metrics label and the fallback to the other version."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, RollbackRule
from serve_app.errors import TierUnavailable
from serve_app.router.versions import (
    RollbackBoard,
    RollbackWindow,
    Versions,
    bucket,
    p99,
    session_of,
    targets,
)

from .router_kit import CHAT, bearer, call, config, engine, router


def versioned(weight: float = 10, shadow: float = 0, **rollback: Any) -> AppConfig:
    return AppConfig.model_validate(
        {
            "tiers": [
                {
                    "name": "small",
                    "version": "v1",
                    "candidate": {
                        "version": "v2",
                        "weight_percent": weight,
                        "shadow_percent": shadow,
                        "rollback": {"window_s": 60, "min_requests": 20, **rollback},
                    },
                }
            ]
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the canary ----------------------------------------------------------------------------


def test_a_bucket_is_stable_and_in_range() -> None:
    assert bucket("alice") == bucket("alice")
    assert all(0 <= bucket(str(i)) < 100 for i in range(1000))


def test_a_90_10_split_over_1000_sessions_is_within_4_percent() -> None:
    versions = Versions(versioned(weight=10))
    picks = [versions.pick("small", f"s:{uuid.uuid4()}").version for _ in range(1000)]
    assert abs(picks.count("v2") / 1000 - 0.10) <= 0.04


def test_a_session_stays_on_its_version() -> None:
    versions = Versions(versioned(weight=50))
    for session in (f"s:{i}" for i in range(50)):
        assert len({versions.pick("small", session).version for _ in range(20)}) == 1


def test_the_weight_is_the_share_of_sessions_at_the_edges() -> None:
    assert {Versions(versioned(0)).pick("small", f"s:{i}").version for i in range(200)} == {"v1"}
    assert {Versions(versioned(100)).pick("small", f"s:{i}").version for i in range(200)} == {"v2"}


def test_the_session_is_the_header_then_the_user_then_the_key() -> None:
    assert session_of({"x-session-id": "a"}, "u", "k") == "s:a"
    assert session_of({}, "u", "k") == "u:u"
    assert session_of({}, None, "k") == "k:k"
    assert session_of({}, 7, None) is None


def test_targets_reach_the_candidate_under_its_own_key() -> None:
    found = targets(versioned())
    assert set(found) == {"small", "small@v2"}
    assert found["small@v2"].version == "v2" and found["small"].version == "v1"


# -- the rollback window -------------------------------------------------------------------


def test_a_window_judges_only_with_enough_requests() -> None:
    window = RollbackWindow(RollbackRule(window_s=60, min_requests=20, max_error_rate=0.05))
    for i in range(19):
        window.add(i, True, 0.1)
    assert window.verdict(19) is None
    window.add(19, True, 0.1)
    assert (window.verdict(19) or "").startswith("error_rate: 100.0% of 20 requests")


def test_old_outcomes_leave_the_window() -> None:
    window = RollbackWindow(RollbackRule(window_s=10, min_requests=5, max_error_rate=0.5))
    for i in range(10):
        window.add(i, True, 0.1)
    for i in range(30, 36):
        window.add(i, False, 0.1)
    assert window.stats(36)["requests"] == 6 and window.verdict(36) is None


def test_the_error_rate_bound_is_strict() -> None:
    window = RollbackWindow(RollbackRule(window_s=60, min_requests=20, max_error_rate=0.05))
    for i in range(20):
        window.add(i, i == 0, 0.1)  # 1 of 20 = 5%: within
    assert window.verdict(20) is None
    window.add(21, True, 0.1)  # 2 of 21
    assert window.verdict(21) is not None


def test_a_slow_p99_rolls_back() -> None:
    window = RollbackWindow(RollbackRule(window_s=60, min_requests=10, max_p99_s=1.0))
    for i in range(100):
        window.add(i * 0.1, False, 0.2 if i < 98 else 3.0)
    assert (window.verdict(10) or "").startswith("p99_latency: 3.00s")


def test_p99_is_the_nearest_rank() -> None:
    assert p99([]) is None
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([5.0]) == 5.0


def test_a_rollback_sends_the_sessions_back_and_stops_the_shadow() -> None:
    clock = Clock()
    versions = Versions(versioned(weight=100, shadow=100), clock=clock)
    assert versions.pick("small", "s:a").version == "v2"
    for _ in range(19):
        assert versions.observe("small@v2", 500, 0.1) is None
    rollback = versions.observe("small@v2", 502, 0.1)
    assert rollback is not None and rollback.code == "error_rate"
    assert versions.pick("small", "s:a").version == "v1"
    assert versions.shadow(versions.stable("small")) is None
    state = versions.state()["tiers"]["small"]["candidate"]
    assert state["weight_percent"] == 0 and state["configured_weight_percent"] == 100
    assert state["rollback"]["reason"].startswith("error_rate")


def test_client_errors_do_not_count_against_a_candidate() -> None:
    versions = Versions(versioned(weight=100))
    for status in [400] * 10 + [429] * 10 + [499] * 10:
        assert versions.observe("small@v2", status, 0.1) is None


def test_a_rollback_lasts_until_the_candidate_changes() -> None:
    versions = Versions(versioned(weight=100))
    versions.roll_back("small@v2", "error_rate: test")
    versions.update(versioned(weight=50))  # the same candidate: still rolled back
    assert versions.pick("small", "s:a").version == "v1"
    cfg = versioned(weight=100).model_dump(mode="json", exclude_unset=True)
    cfg["tiers"][0]["candidate"]["version"] = "v3"
    versions.update(AppConfig.model_validate(cfg))
    assert versions.rolled_back == {} and versions.pick("small", "s:a").version == "v3"


def test_the_board_shares_rollbacks_between_replicas() -> None:
    board, one, two = RollbackBoard(), Versions(versioned(100)), Versions(versioned(100))
    one.roll_back("small@v2", "error_rate: seen by one", at=5.0)
    mine = {k: vars(v) for k, v in one.rolled_back.items()}
    assert board.sync(one.candidates, mine) == {"small@v2": {"reason": "error_rate: seen by one",
                                                             "at": 5.0}}  # fmt: skip
    assert two.merge(board.sync(two.candidates, {})) == ["small@v2"]
    assert two.pick("small", "s:a").version == "v1"
    board.forget([])
    assert board.sync(["small@v2"], {}) == {}


def test_the_shadow_draws_its_share_of_stable_requests() -> None:
    versions = Versions(versioned(weight=0, shadow=30))
    stable = versions.stable("small")
    drawn = sum(versions.shadow(stable) is not None for _ in range(2000))
    assert abs(drawn / 2000 - 0.30) < 0.05
    assert versions.shadow(versions.target("small@v2")) is None


# -- the configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"version": "v1"}, "must differ"),
        ({"version": "V2!"}, "version 'V2!'"),
        ({"version": "v2", "weight_percent": 101}, "less than or equal to 100"),
        (
            {"version": "v2", "engine": {"max_input_tokens": 8, "max_total_tokens": 64}},
            "candidate .v2.: .*max_tokens_limit",
        ),
    ],
)
def test_a_bad_candidate_is_an_error_naming_it(candidate: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate(
            {"tiers": [{"name": "small", "version": "v1", "candidate": candidate}]}
        )


def test_a_candidate_of_an_unnamed_stable_version_may_not_be_called_stable() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        AppConfig.model_validate({"tiers": [{"name": "small", "candidate": {"version": "stable"}}]})


# -- through the router ----------------------------------------------------------------------


def with_candidate(tmp: Path, weight: float) -> AppConfig:
    cfg = config(tmp, keys=False).model_dump(mode="json", exclude_unset=True)
    cfg["tiers"][0]["candidate"] = {"version": "v2", "weight_percent": weight}
    return AppConfig.model_validate(cfg)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate_stream"])
def test_the_answer_and_its_metrics_name_the_version(tmp_path: Path, path: str) -> None:
    r, recorder, _ = router(with_candidate(tmp_path, 100), engine)
    body = {**CHAT, "stream": True} if path.startswith("/v1") else {"inputs": "hi"}
    answer = asyncio.run(call(r.asgi_app(), "POST", path, body, {"x-session-id": "a"}))
    assert answer.status == 200, answer.body
    assert answer.headers["x-served-version"] == "v2" and answer.headers["x-tier"] == "small"
    assert recorder.versions == ["v2"]


def test_an_unversioned_tier_is_served_by_its_stable_version(tmp_path: Path) -> None:
    r, recorder, _ = router(config(tmp_path, keys=False), engine)
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions", CHAT))
    assert answer.headers["x-served-version"] == "stable" and recorder.versions == ["stable"]


def test_a_version_that_cannot_take_the_request_hands_it_to_the_other(tmp_path: Path) -> None:
    r, recorder, _ = router(with_candidate(tmp_path, 100), engine)
    transport = r._transport  # type: ignore[attr-defined]
    real = transport.request

    def request(tier: str, c: Any) -> Any:
        if tier == "small@v2":
            raise TierUnavailable("tier 'small@v2' is being deleted")
        return real(tier, c)

    transport.request = request
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions", CHAT))
    assert answer.status == 200 and answer.headers["x-served-version"] == "stable"
    assert recorder.versions == ["stable"]


def test_the_versions_route_shows_the_state(tmp_path: Path) -> None:
    r, _, _ = router(with_candidate(tmp_path, 25), engine)
    answer = asyncio.run(call(r.asgi_app(), "GET", "/v1/versions"))
    small = answer.json()["tiers"]["small"]
    assert small["stable"]["application"] == "tier-small"
    assert small["candidate"]["application"] == "tier-small@v2"
    assert small["candidate"]["weight_percent"] == 25


def test_an_error_answer_names_the_version_too(tmp_path: Path) -> None:
    r, _, _ = router(with_candidate(tmp_path, 100), engine)
    transport = r._transport  # type: ignore[attr-defined]

    def request(tier: str, c: Any) -> Any:
        raise TierUnavailable(f"tier {tier!r} has no running replica")

    transport.request = request
    answer = asyncio.run(call(r.asgi_app(), "POST", "/v1/chat/completions", CHAT))
    assert answer.status == 503 and answer.headers["x-served-version"] == "stable"


def test_a_candidate_that_may_scale_to_zero_keeps_no_spare_lease() -> None:
    cfg = versioned().model_dump(mode="json", exclude_unset=True)
    cfg["tiers"][0]["candidate"]["replicas"] = {"min": 0, "max": 1}
    found = targets(AppConfig.model_validate(cfg))
    assert found["small@v2"].tuning.lease_spare_s == 0 and found["small"].tuning.lease_spare_s > 0


def test_the_versions_route_needs_a_key_when_keys_are_on(tmp_path: Path) -> None:
    cfg = config(tmp_path).model_dump(mode="json", exclude_unset=True)
    cfg["tiers"][0]["candidate"] = {"version": "v2"}
    r, _, _ = router(AppConfig.model_validate(cfg), engine)
    assert asyncio.run(call(r.asgi_app(), "GET", "/v1/versions")).status == 401
    answer = asyncio.run(call(r.asgi_app(), "GET", "/v1/versions", None, bearer("team-a")))
    assert answer.status == 200 and answer.json()["tiers"]["small"]["candidate"]["version"] == "v2"


def test_a_shadowed_candidate_serves_nobody_when_stable_cannot(tmp_path: Path) -> None:
    versions = Versions(versioned(weight=0, shadow=100))
    assert versions.other(versions.stable("small")) is None
    assert Versions(versioned(weight=10)).other(versions.stable("small")) is not None


def test_a_version_no_longer_configured_cannot_take_requests_and_moves_them() -> None:
    from serve_app.router.dispatch import ServeTransport, moved
    from serve_app.tier.call import TierCall

    # a candidate promoted away while a request that chose it waited: its key is gone
    transport = ServeTransport({}, {}, keep_leases=True)
    call = TierCall("/v1/chat/completions", {"messages": []}, False, 8, 2)
    for send in (transport.request, transport.stream):
        with pytest.raises(TierUnavailable, match="no longer configured") as caught:
            send("small@v2", call)
        assert moved(caught.value)
