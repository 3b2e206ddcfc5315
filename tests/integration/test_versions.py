"""A tier's versions through the real local stack (simulated engines, real Ray Serve, `serve
deploy` of the rendered config): the canary's split and its sticky sessions, shadow copies and
their comparison metrics, a failing candidate rolled back, and a promote with streams in flight.
The tests run in order on one stack, each deploying the next step of a rollout."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers import all_deployments, metric_samples, wait_for

from .conftest import Stack


def engine(ttft_ms: int = 20, failure_rate: float = 0.0) -> dict[str, Any]:
    """A simulated engine: 400 tokens at most, one every 25 ms (a 150-token stream takes ~4 s)."""
    flags = ["--sim-ttft-ms", str(ttft_ms), "--sim-itl-ms", "25", "--sim-output-tokens", "400"]
    if failure_rate:
        flags += ["--sim-failure-rate", str(failure_rate)]
    return {
        "launcher": "local",
        "model_id": "simulated",
        "max_input_tokens": 512,
        "max_total_tokens": 1024,
        "tuning": {"max_batch_size": 32, "max_concurrent_requests": 128},
        "extra_args": flags,
    }


def config(
    version: str, candidate: dict[str, Any] | None, stable_engine: Any = None, routers: int = 1
) -> Any:
    tier: dict[str, Any] = {
        "name": "small",
        "version": version,
        "engine": stable_engine or engine(),
        "default_max_tokens": 4,
        "max_tokens_limit": 500,
        "tuning": {"max_ongoing_requests": 128},
    }
    if candidate is not None:
        tier["candidate"] = candidate
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1"},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {"router": {"replicas": routers}, "tiers": [tier]},
        }],
    }  # fmt: skip


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    candidate = {"version": "v2", "engine": engine(ttft_ms=30), "weight_percent": 10}
    ray_head.deploy(render(config("v1", candidate)))
    return ray_head


def render(source: dict[str, Any]) -> dict[str, Any]:
    """The rendered config, as `make configs` writes it: what users `serve deploy`."""
    from serve_app.serve_config import render as rendered

    return rendered(source)


def ask(stack: Stack, session: str | None = None, stream: bool = False, tokens: int = 4) -> Any:
    headers = {"x-session-id": session} if session else {}
    body = {"model": "small", "prompt": "hello there", "max_tokens": tokens, "stream": stream}
    return httpx.post(f"{stack.url}/v1/completions", json=body, headers=headers, timeout=60)


def served(reply: httpx.Response) -> str:
    return reply.headers.get("x-served-version", "?")


def replicas(stack: Stack) -> dict[str, set[str]]:
    apps = httpx.get(f"{stack.head.dashboard}/api/serve/applications/", timeout=10).json()
    return {
        name: {r["actor_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"}
        for name, deployment in all_deployments(apps["applications"]).items()
    }


def state(stack: Stack) -> dict[str, Any]:
    reply = httpx.get(f"{stack.url}/v1/versions", timeout=10).json()
    return reply["tiers"]["small"]  # type: ignore[no-any-return]


def test_a_90_10_canary_splits_sessions_and_keeps_each_on_its_version(stack: Stack) -> None:
    wait_for(lambda: ask(stack).status_code == 200, 120, "the tier to answer")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: ask(stack, str(uuid.uuid4())), range(1000)))
    assert all(r.status_code == 200 for r in replies)
    share = sum(served(r) == "v2" for r in replies) / len(replies)
    print(f"canary 90/10 over 1000 sessions: {share:.1%} served by v2")
    assert abs(share - 0.10) <= 0.04
    for session in ("alice", "bob", "carol", "dave"):
        seen = {served(ask(stack, session)) for _ in range(10)}
        assert len(seen) == 1, (session, seen)
    names = {r.headers["x-tier"] for r in replies}
    assert names == {"small"}


def test_shadow_copies_are_compared_without_slowing_the_client(stack: Stack) -> None:
    def p50(n: int = 150) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            assert ask(stack).status_code == 200
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    candidate = {"version": "v2", "engine": engine(ttft_ms=30), "weight_percent": 0}
    stack.deploy(render(config("v1", candidate)))
    wait_for(lambda: state(stack)["candidate"]["weight_percent"] == 0, 30, "weight 0")
    before = p50()
    stack.deploy(render(config("v1", {**candidate, "shadow_percent": 100})))
    wait_for(lambda: state(stack)["candidate"]["shadow_percent"] == 100, 30, "shadow 100")
    during = p50()
    streamed = ask(stack, stream=True)
    assert streamed.status_code == 200 and served(streamed) == "v1"
    print(
        f"client p50 without shadow {before * 1000:.1f} ms, with 100% shadow {during * 1000:.1f} ms"
    )

    def shadowed() -> dict[str, float]:
        return metric_samples(stack.head.metrics_port, "ray_serve_app_shadow_requests_total")

    wait_for(lambda: sum(shadowed().values()) >= 100, 60, "shadow copies in the metrics")
    samples = shadowed()
    print(f"shadow copies: {samples}")
    ok = sum(v for k, v in samples.items() if 'result="ok"' in k)
    assert ok >= 100
    similarity = metric_samples(stack.head.metrics_port, "ray_serve_app_shadow_text_similarity_sum")
    count = metric_samples(stack.head.metrics_port, "ray_serve_app_shadow_text_similarity_count")
    ratio = metric_samples(stack.head.metrics_port, "ray_serve_app_shadow_latency_ratio_sum")
    ratio_n = metric_samples(stack.head.metrics_port, "ray_serve_app_shadow_latency_ratio_count")
    mean_similarity = sum(similarity.values()) / sum(count.values())
    mean_ratio = sum(ratio.values()) / sum(ratio_n.values())
    print(f"mean text similarity {mean_similarity:.3f}, mean latency ratio {mean_ratio:.2f}")
    assert mean_similarity > 0.9  # the same timetable's words
    assert during < before * 2 + 0.05  # reported above; only a gross slowdown fails


def test_a_failing_candidate_is_rolled_back_with_no_stable_errors(stack: Stack) -> None:
    rule = {"window_s": 20, "min_requests": 10, "max_error_rate": 0.05}
    faulty = {"version": "v3", "engine": engine(failure_rate=0.5), "weight_percent": 50,
              "rollback": rule}  # fmt: skip
    stack.deploy(render(config("v1", faulty, routers=2)))  # the decision is shared by both
    wait_for(lambda: state(stack)["candidate"]["version"] == "v3", 60, "candidate v3")
    wait_for(lambda: len(replicas(stack).get("router", ())) == 2, 120, "two router replicas")
    statuses: dict[str, list[int]] = {"v1": [], "v3": []}
    first_v3: float | None = None
    deadline = time.monotonic() + 90
    rolled: float | None = None
    while time.monotonic() < deadline:
        reply = ask(stack, str(uuid.uuid4()))
        version = served(reply)
        statuses.setdefault(version, []).append(reply.status_code)
        if version == "v3" and first_v3 is None:
            first_v3 = time.monotonic()
        if first_v3 is not None and state(stack)["candidate"]["rollback"] is not None:
            rolled = time.monotonic()
            break
    assert first_v3 is not None and rolled is not None, statuses
    took = rolled - first_v3
    after = [ask(stack, str(uuid.uuid4())) for _ in range(100)]
    candidate = state(stack)["candidate"]
    print(f"rolled back {took:.1f}s after the candidate's first request: "
          f"{candidate['rollback']['reason']}; v3 answers {len(statuses['v3'])} "
          f"({sum(s >= 500 for s in statuses['v3'])} failed), v1 answers {len(statuses['v1'])} "
          f"(failed: {sum(s != 200 for s in statuses['v1'])})")  # fmt: skip
    assert took <= 30

    def every_router_rolled_back() -> bool:  # HAProxy spreads these over both replicas
        return all(state(stack)["candidate"]["rollback"] is not None for _ in range(20))

    wait_for(every_router_rolled_back, 10, "every router replica to apply the rollback")
    assert set(statuses) <= {"v1", "v3"}, statuses  # every answer names its version
    assert all(s == 200 for s in statuses["v1"])
    assert all(r.status_code == 200 and served(r) == "v1" for r in after)
    assert candidate["weight_percent"] == 0 and candidate["configured_weight_percent"] == 50
    gauge = metric_samples(stack.head.metrics_port, "ray_serve_app_version_rolled_back")
    wait_for(
        lambda: any('version="v3"' in k for k in metric_samples(
            stack.head.metrics_port, "ray_serve_app_version_rolled_back")),
        30, "the rollback metric",
    )  # fmt: skip
    assert gauge is not None


def test_promote_with_streams_in_flight_loses_none(stack: Stack) -> None:
    good = {"version": "v4", "engine": engine(ttft_ms=30), "weight_percent": 50}
    stack.deploy(render(config("v1", good, routers=2)))
    wait_for(lambda: ask(stack).status_code == 200, 60, "the tier")
    wait_for(lambda: state(stack)["candidate"]["version"] == "v4", 60, "candidate v4")
    before = replicas(stack)
    assert before.get("tier-small@v4") and before.get("tier-small@v1")
    results: list[tuple[str, int, bool]] = []
    ended: list[float] = []
    lock = threading.Lock()

    def stream_one(i: int) -> None:
        body = {"model": "small", "prompt": "go", "max_tokens": 400, "stream": True}
        try:
            headers = {"x-session-id": f"promote-{i}"}
            url = f"{stack.url}/v1/completions"
            with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as reply:
                text = "".join(reply.iter_text())
                done = text.rstrip().endswith("data: [DONE]") and '"error"' not in text
                with lock:
                    results.append((served(reply), reply.status_code, done))
                    ended.append(time.monotonic())
        except httpx.HTTPError as exc:
            with lock:
                results.append((repr(exc), 0, False))

    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    time.sleep(0.5)  # every stream under way (each takes ~10 s)
    promoted = config("v4", None, stable_engine=good["engine"], routers=2)
    started = time.monotonic()
    stack.deploy(render(promoted), wait=False)
    deployed = time.monotonic()
    # new requests during the promote
    during = [ask(stack, str(uuid.uuid4())) for _ in range(30)]
    for t in threads:
        t.join(timeout=120)
    wait_for(lambda: "tier-small@v1" not in replicas(stack), 180, "the old version's deletion")
    gone = time.monotonic() - started
    after = replicas(stack)
    by_version = {v: sum(1 for r in results if r[0] == v) for v in ("v1", "v4")}
    lost = [r for r in results if not (r[1] == 200 and r[2])]
    later = sum(t > deployed for t in ended)
    print(f"promote: {len(results)} streams in flight ({by_version}; {later} ended after "
          f"`serve deploy` returned, {deployed - started:.1f}s after it began), {len(lost)} lost; "
          f"{sum(r.status_code == 200 for r in during)}/{len(during)} requests during it "
          f"answered; old version deleted {gone:.1f}s after the deploy")  # fmt: skip
    assert len(results) == 24 and not lost, lost
    assert all(r.status_code == 200 for r in during), [
        r.text for r in during if r.status_code != 200
    ]
    assert after["tier-small@v4"] == before["tier-small@v4"]  # the promoted version: no restart
    assert {served(ask(stack, str(uuid.uuid4()))) for _ in range(20)} == {"v4"}
    assert state(stack)["candidate"] is None
