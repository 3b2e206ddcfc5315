"""Every exit of a request settles in-flight, metrics and quota; keys, quotas and bad input
with two router replicas and the real engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import text_generation
import yaml
from huggingface_hub import InferenceClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.hosts import (
    engine_key,
    engine_processes,
    engine_url,
    live_processes,
    router_addresses,
)
from serve_app.serve_env import CLIENT_TIMEOUT, INGRESS_GUARDS
from tests.helpers import lease_grants, metric_samples, settled_value, wait_for

from .conftest import Stack, local_config

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
KEYS = {
    "team-a": "sk-team-a-0123456789abcdef",
    "small-only": "sk-small-only-0123456789abcdef",
    "metered": "sk-metered-0123456789abcdef",
    "tokens": "sk-tokens-0123456789abcdef",
    "streamer": "sk-streamer-0123456789abcdef",
}
OVERFLOW_AT = 3


@pytest.fixture(scope="module")
def stack(ray_head: Stack, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    keys = [
        {"name": "team-a", "key": KEYS["team-a"]},
        {"name": "small-only", "key": KEYS["small-only"], "tiers": ["small"]},
        {"name": "metered", "key": KEYS["metered"], "requests_per_minute": 1000},
        {"name": "tokens", "key": KEYS["tokens"], "tokens_per_minute": 400},
        {"name": "streamer", "key": KEYS["streamer"]},
    ]
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump(keys))
    config = local_config()
    args = config["applications"][0]["args"]
    args["router"].update(
        {"replicas": 2, "api_keys": {"file": str(path)}, "fallback_tier": "small",
         "tuning": {"max_messages": 100, "body_timeout_s": 3, "max_header_bytes": 8192}}
    )  # fmt: skip
    for tier in args["tiers"]:
        tier["default_max_tokens"] = 4
    # a stream that lasts 100 s (50 ms a token), for a router to die in the middle of
    args["tiers"].append(
        {"name": "sim", "default_max_tokens": 2000, "max_tokens_limit": 3000,
         "engine": {"launcher": "local", "model_id": "simulated", "max_input_tokens": 1024,
                    "max_total_tokens": 4096,
                    "extra_args": ["--sim-itl-ms", "50", "--sim-output-tokens", "2000"]}}
    )  # fmt: skip
    # `sim`'s tests count the leases requests take: no spare lease renewed meanwhile
    args["tiers"][-1]["tuning"] = {"lease_spare_s": 0}
    # a tier of its own for the spare lease: kept 4 s after a router's last request
    args["tiers"].append(
        {"name": "spare", "tuning": {"lease_spare_s": 4}, "default_max_tokens": 4,
         "engine": {"launcher": "local", "model_id": "simulated",
                    "extra_args": ["--sim-output-tokens", "4"]}}
    )  # fmt: skip
    args["tiers"][0].setdefault("tuning", {})["overflow_at_in_flight"] = OVERFLOW_AT
    ray_head.deploy(config)
    return ray_head


def auth(name: str = "team-a") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


def metric(stack: Stack, name: str) -> dict[str, float]:
    return metric_samples(stack.head.metrics_port, name)


def tier_in_flight(stack: Stack) -> dict[str, float]:
    samples = metric(stack, "ray_serve_app_in_flight_requests")
    totals: dict[str, float] = {}
    for labels, value in samples.items():
        tier = re.search(r'tier="([^"]+)"', labels)
        if tier:
            totals[tier.group(1)] = totals.get(tier.group(1), 0) + value
    return totals


def tenant_tokens(stack: Stack, tenant: str) -> float:
    samples = metric(stack, "ray_serve_app_tenant_tokens_total")
    return sum(v for labels, v in samples.items() if f'tenant="{tenant}"' in labels)


def router_urls(stack: Stack) -> list[str]:
    found = router_addresses(stack.head.temp_dir)
    assert found, "HAProxy's config names no router replica"
    return [f"http://{address}" for address in found]


def engine_loads() -> dict[int, float]:
    """Every engine's own count of requests queued or decoding (TGI's gauges)."""
    loads = {}
    for pid, argv in engine_processes().items():
        with contextlib.suppress(httpx.HTTPError, ValueError):
            text = httpx.get(engine_url(argv) + "/metrics", timeout=5).text
            loads[pid] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(("tgi_queue_size ", "tgi_batch_current_size "))
            )
    return loads


async def hang_up_waiting(base_url: str, body: dict[str, Any], clients: int) -> None:
    """`clients` whole-answer requests, each abandoned after 1.5 s (the client closes)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120, headers=auth()) as client:

        async def one() -> None:
            with contextlib.suppress(asyncio.TimeoutError, httpx.HTTPError):
                await asyncio.wait_for(client.post("/v1/chat/completions", json=body), 1.5)

        await asyncio.gather(*[one() for _ in range(clients)])


def test_disconnect_storm_leaves_nothing_in_flight_and_no_spill_over(stack: Stack) -> None:
    """100 clients hang up: waiting for whole answers (half at the routers' own ports, half
    through HAProxy), mid chat stream, mid TGI stream."""
    routers = router_urls(stack)

    async def storm() -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120, headers=auth()) as client:

            async def streaming(route: str, body: dict[str, Any]) -> None:  # hangs up mid-stream
                try:
                    async with client.stream("POST", route, json=body) as reply:
                        async for line in reply.aiter_lines():
                            if line.startswith("data:"):
                                break
                except httpx.HTTPError:
                    pass

            whole = {"model": "small", "messages": STORY, "max_tokens": 200}
            short = {**whole, "max_tokens": 24}
            chat = {"model": "small", "messages": STORY, "max_tokens": 200, "stream": True}
            tgi = {"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 200}}
            jobs = [hang_up_waiting(url, whole, 25 // len(routers)) for url in routers]
            jobs += [hang_up_waiting(stack.url, short, 25)]
            jobs += [streaming("/v1/chat/completions", chat) for _ in range(40)]
            jobs += [streaming("/generate_stream", tgi) for _ in range(10)]
            await asyncio.gather(*jobs)

    asyncio.run(storm())

    def settled() -> bool:
        counts = tier_in_flight(stack)
        return bool(counts) and all(v == 0 for v in counts.values())

    def leases_returned() -> bool:
        """The tier replicas' count of held engine leases: every one was given back."""
        held = metric(stack, "ray_serve_app_engine_leases")
        return bool(held) and all(v == 0 for v in held.values())

    wait_for(settled, 90, "every in-flight gauge back at 0")
    wait_for(leases_returned, 60, "every tier replica's ongoing requests back at 0")
    wait_for(lambda: not any(engine_loads().values()), 60, "every engine idle")
    after = httpx.post(f"{stack.url}/v1/chat/completions", headers=auth(), timeout=120,
                       json={"model": "small", "messages": QUESTION, "max_tokens": 4})  # fmt: skip
    assert after.status_code == 200, after.text
    assert (after.headers["x-tier"], after.headers["x-tier-reason"]) == ("small", "model")


def test_an_abandoned_whole_answer_stops_its_generation(stack: Stack) -> None:
    """Clients that leave while waiting for whole 100 s answers (the sim tier), at each router
    replica's own port: every engine drops the work within seconds."""
    sim = [pid for pid, argv in engine_processes().items() if "simulated" in argv]
    body = {"model": "sim", "messages": STORY, "max_tokens": 2000}
    for url in router_urls(stack):
        asyncio.run(hang_up_waiting(url, body, 4))
    wait_for(lambda: not any(engine_loads().get(pid, 1) for pid in sim), 15, "the sim engine idle")


def test_a_small_only_key_is_never_refused_small_under_overflow(stack: Stack) -> None:
    long = {"model": "small", "messages": STORY, "max_tokens": 300}
    probe = {"model": "small", "messages": QUESTION, "max_tokens": 2}

    def post(key: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{stack.url}/v1/chat/completions", headers=auth(key), timeout=240,
                          json=body)  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        # more than both router replicas' OVERFLOW_AT small requests in flight: small overflows
        holders = [pool.submit(post, "team-a", long) for _ in range(4 * OVERFLOW_AT)]
        time.sleep(3)
        team = [pool.submit(post, "team-a", probe) for _ in range(3)]
        small_only = [pool.submit(post, "small-only", probe) for _ in range(3)]
        replies = [f.result() for f in team + small_only + holders]
    assert "large" in {r.headers.get("x-tier") for r in replies[:3]}  # small did overflow
    for reply in replies[3:6]:
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-tier"] == "small"


def test_models_list_only_what_a_key_may_use(stack: Stack) -> None:
    def ids(name: str) -> set[str]:
        reply = httpx.get(f"{stack.url}/v1/models", headers=auth(name), timeout=10)
        return {m["id"] for m in reply.json()["data"]}

    assert ids("small-only") == {"small", "smollm2", "gpt-4o-mini"}
    assert {"small", "large", "gpt-4o", "auto"} <= ids("team-a")
    hidden = httpx.get(f"{stack.url}/v1/models/large", headers=auth("small-only"), timeout=10)
    assert hidden.status_code == 404


def test_tgi_routes_and_early_closed_streams_are_charged(stack: Stack) -> None:
    before = tenant_tokens(stack, "streamer")
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", headers=auth("streamer"),
                      json={"model": "small", "messages": STORY, "max_tokens": 100,
                            "stream": True}, timeout=120) as reply:  # fmt: skip
        seen = 0
        for line in reply.iter_lines():
            seen += line.startswith("data:")
            if seen == 5:
                break
    wait_for(lambda: tenant_tokens(stack, "streamer") >= before + 5, 60, "the cut stream charged")

    before = tenant_tokens(stack, "tokens")
    body = {"inputs": "Tell me a long story.", "parameters": {"max_new_tokens": 100}}

    def generate(route: str) -> httpx.Response:
        return httpx.post(f"{stack.url}{route}", headers={**auth("tokens"), "x-tier": "sim"},
                          timeout=120, json=body)  # fmt: skip

    # each call reserves its prompt (at most 21 tokens) + 100 of the key's 400 a minute: three
    # fit at once, and on the sim tier (50 ms a token) none finishes, giving back what it did
    # not use, before all six have asked
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(generate, ["/generate", "/", "/generate", "/", "/generate", "/"]))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
    assert set(statuses) == {200, 429}, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert reply.json()["error_type"] == "overloaded"
            assert reply.headers["x-ratelimit-limit-tokens"] == "400"
            assert int(reply.headers["retry-after"]) >= 1
    wait_for(lambda: tenant_tokens(stack, "tokens") > before, 60, "the TGI routes charged")
    charged = tenant_tokens(stack, "tokens") - before
    assert 0 < charged <= statuses.count(200) * 121, charged


def test_typed_quota_429_with_rate_limit_headers(stack: Stack) -> None:
    ok = httpx.post(f"{stack.url}/v1/chat/completions", headers=auth("metered"), timeout=60,
                    json={"model": "small", "messages": QUESTION, "max_tokens": 2})  # fmt: skip
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(ok.headers["x-ratelimit-remaining-requests"]) < 1000
    assert re.fullmatch(r"\d+(ms|s|m\d+s)", ok.headers["x-ratelimit-reset-requests"])


def ledger_replicas() -> list[int]:
    return [
        p.pid
        for p in live_processes()
        if p.cmdline.startswith(b"ray::ServeReplica:llm:quota-ledger")
    ]


def metered_chat(stack: Stack) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", headers=auth("metered"), timeout=60,
                      json={"model": "small", "messages": QUESTION, "max_tokens": 2})  # fmt: skip


def test_a_ledger_that_does_not_answer_denies_metered_keys_then_comes_back(stack: Stack) -> None:
    """A frozen ledger (stopped, not dead: Serve cannot replace it) is what `ledger_timeout_s`
    bounds: a metered key gets 503 quota_unavailable with Retry-After after 1 s, a key without
    quotas is answered as usual, and once the ledger runs again the metered key is too."""
    (victim,) = ledger_replicas()
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        frozen = [metered_chat(stack) for _ in range(3)]
        took = (time.monotonic() - started) / 3
        free = httpx.post(f"{stack.url}/v1/chat/completions", headers=auth(), timeout=60,
                          json={"model": "small", "messages": QUESTION})  # fmt: skip
    finally:
        os.kill(victim, signal.SIGCONT)
    assert [r.status_code for r in frozen] == [503] * 3, [r.text[:200] for r in frozen]
    assert {r.json()["error"]["code"] for r in frozen} == {"quota_unavailable"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in frozen)
    assert took < 10, took  # bounded by ledger_timeout_s, not by the ledger
    assert free.status_code == 200
    wait_for(lambda: metered_chat(stack).status_code == 200, 60, "the metered key answered")


def test_a_killed_ledger_is_replaced_and_nothing_hangs(stack: Stack) -> None:
    """Killed, the ledger is started again by Serve; meanwhile a metered key is answered or
    refused with 503 quota_unavailable (whether it sees a 503 depends on how fast Serve
    replaces it), never anything else and never after more than the request's own time."""
    (victim,) = ledger_replicas()
    os.kill(victim, signal.SIGKILL)
    statuses, codes = [], set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        reply = metered_chat(stack)
        statuses.append(reply.status_code)
        if reply.status_code == 503:
            codes.add(reply.json()["error"]["code"])
            assert reply.headers["retry-after"]
        replaced = ledger_replicas()
        if reply.status_code == 200 and replaced and victim not in replaced:
            break
        time.sleep(0.2)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[-1] == 200, statuses
    assert codes <= {"quota_unavailable"}
    assert ledger_replicas() and victim not in ledger_replicas()


def tier_leases(stack: Stack, tier: str) -> float:
    """Engine leases a tier's replicas count as held."""
    held = metric(stack, "ray_serve_app_engine_leases")
    return sum(v for labels, v in held.items() if f'tier="{tier}"' in labels)


def router_replicas() -> list[int]:
    return [
        p.pid for p in live_processes() if p.cmdline.startswith(b"ray::ServeReplica:llm:router")
    ]


def first_data(lines: Iterator[str]) -> str:
    """The first event of a stream whose reading goes on (the caller keeps `lines`: a dropped
    line iterator closes httpx's connection, which is a client hanging up)."""
    for line in lines:
        if line.startswith("data:"):
            return line
    raise AssertionError("the stream ended without an event")


def test_a_stream_holds_its_scope_and_lease_to_its_last_chunk(stack: Stack) -> None:
    body = {"model": "sim", "messages": STORY, "max_tokens": 2000, "stream": True}
    url = f"{stack.url}/v1/chat/completions"
    with httpx.stream("POST", url, headers=auth(), json=body, timeout=120) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        first_data(lines)
        wait_for(lambda: tier_leases(stack, "sim") >= 1, 30, "the lease counted on the tier")
        wait_for(lambda: tier_in_flight(stack).get("sim", 0) >= 1, 30, "the stream in flight")
        first_data(lines)  # still streaming
    wait_for(lambda: tier_leases(stack, "sim") == 0, 60, "the lease back once the client left")


def test_requests_in_a_row_reuse_one_lease_and_give_it_back(stack: Stack) -> None:
    """A router keeps a finished request's lease for the next request of the tier: ten streams
    in a row through one router replica take one or two leases, not ten, and the last lease is
    back on the tier's gauge once `lease_idle_s` has passed."""

    def grants() -> float:
        return lease_grants(stack.head.metrics_port, "sim")

    before = settled_value(grants)
    body = {"model": "sim", "messages": QUESTION, "max_tokens": 2, "stream": True}
    with httpx.Client(base_url=router_urls(stack)[0], headers=auth(), timeout=60) as client:
        for _ in range(10):
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                assert reply.status_code == 200
                assert "data: [DONE]" in list(reply.iter_lines())
    wait_for(lambda: grants() > before, 60, "the grants counted")
    taken = settled_value(grants) - before
    assert 1 <= taken <= 2, taken
    wait_for(lambda: tier_leases(stack, "sim") == 0, 60, "the kept lease given back")


def test_a_router_keeps_a_spare_lease_through_a_pause_and_then_gives_it_back(stack: Stack) -> None:
    """After its last request of a tier, a router keeps one lease for `lease_spare_s` (4 s
    here) and renews it before it is `lease_reuse_s` (2 s) old: the tier's replica grants
    leases while no request comes (a fresh one, then the old one back), and holds none once
    the 4 s have passed."""

    def grants() -> float:
        return lease_grants(stack.head.metrics_port, "spare")

    before = grants()  # the tier's first request is below
    body = {"model": "spare", "messages": QUESTION, "stream": True}
    url = f"{router_urls(stack)[0]}/v1/chat/completions"
    with httpx.stream("POST", url, headers=auth(), json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert "data: [DONE]" in list(reply.iter_lines())
    wait_for(lambda: grants() >= before + 3, 60, "the spare renewed while no request came")
    taken = settled_value(grants) - before
    assert 3 <= taken <= 5, taken  # the request's lease, renewed at 1.5 s and 3 s
    wait_for(lambda: tier_leases(stack, "spare") == 0, 60, "the spare given back")


def test_killed_routers_give_their_leases_back_at_once(stack: Stack) -> None:
    """Routers die mid-stream: the tier replicas' leases end when the routers' connections
    drop, not after `request_timeout_s` (300 s) nor at the 100 s streams' own end."""
    body = {"model": "sim", "messages": STORY, "max_tokens": 2000, "stream": True}
    url = f"{stack.url}/v1/chat/completions"
    with contextlib.ExitStack() as held:
        for _ in range(2):
            reply = held.enter_context(
                httpx.stream("POST", url, headers=auth(), json=body, timeout=120)
            )
            assert reply.status_code == 200
            first_data(held.enter_context(contextlib.closing(reply.iter_lines())))
        wait_for(lambda: tier_leases(stack, "sim") >= 2, 60, "both leases counted on the tier")
        killed = router_replicas()
        assert len(killed) == 2
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        wait_for(lambda: tier_leases(stack, "sim") == 0, 60, "every lease back")
        assert time.monotonic() - start < 60

    def answers() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            reply = httpx.post(f"{stack.url}/v1/chat/completions", headers=auth(), timeout=60,
                               json={"model": "small", "messages": QUESTION, "max_tokens": 2})  # fmt: skip
            return reply.status_code == 200
        return False

    wait_for(answers, 180, "Serve to restart the routers")
    assert not set(killed) & set(router_replicas())


# -- malformed input: every case a 4xx ------------------------------------------------------

# within the body limit (bodies over it are refused unread, in test_metering.py)
DEEP = "[" * 50_000 + "]" * 50_000
MALFORMED = [
    # (route, raw body, extra headers, status)
    ("/v1/chat/completions", DEEP.encode(), {}, 400),
    ("/generate", ('{"inputs": ' + DEEP + "}").encode(), {}, 422),
    ("/v1/chat/completions", b'{"model": "small", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400),
    ("/generate", b'{"inputs": "\\ud800"}', {}, 422),
    ("/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": 1000.0}}', {}, 422),
    ("/generate_stream", b'{"inputs": "hi", "parameters": {"max_new_tokens": 100000}}', {}, 422),
    ("/v1/chat/completions", json.dumps({"model": "small", "messages": [{"role": "user", "content": "x"}] * 1_500}).encode(), {}, 400),
    ("/v1/chat/completions", b"\xff\xfe{}", {}, 400),
    ("/v1/chat/completions", b'{"model": "small", "messages": [], "x": NaN}', {}, 400),
    # over the router's max_header_bytes (8 KiB here), within the ingress's 16 KiB buffer
    ("/v1/chat/completions", json.dumps({"model": "small", "messages": QUESTION}).encode(), {"x-big": "a" * 12_000}, 431),
    # headers Serve's ingress reads as UTF-8 (serve_app/router/ingress.py)
    ("/v1/chat/completions", json.dumps({"model": "small", "messages": QUESTION}).encode(), {"x-session-id": b"\xff\xfe"}, 400),
    ("/generate", b'{"inputs": "hi"}', {"traceparent": b"\xc3"}, 422),
]  # fmt: skip


@pytest.mark.parametrize(("route", "raw", "headers", "status"), MALFORMED)
def test_malformed_input_is_a_4xx(
    stack: Stack, route: str, raw: bytes, headers: dict[str, str | bytes], status: int
) -> None:
    reply = httpx.post(f"{stack.url}{route}", content=raw, timeout=60,
                       headers={**auth(), "content-type": "application/json", **headers})  # fmt: skip
    assert reply.status_code == status, reply.text[:300]
    if route.startswith("/v1"):
        assert reply.json()["error"]["message"]
    else:
        assert reply.json()["error_type"] == "validation"


def test_headers_past_the_ingress_buffer_are_refused_there(stack: Stack) -> None:
    """HAProxy, in front of the router, refuses a request whose headers outgrow its 16 KiB
    buffer with its own 400 page, before the router sees it."""
    reply = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                       json={"model": "small", "messages": QUESTION},
                       headers={**auth(), "x-big": "a" * 40_000})  # fmt: skip
    assert reply.status_code == 400
    assert httpx.get(f"{stack.url}/health", timeout=10).status_code == 200


def test_a_request_id_that_is_not_utf8_is_replaced_with_a_fresh_one(stack: Stack) -> None:
    body = {"model": "small", "messages": QUESTION}
    for route, sent in [("/v1/chat/completions", body), ("/generate", {"inputs": "Hi"})]:
        reply = httpx.post(f"{stack.url}{route}", json=sent, timeout=60,
                           headers={**auth(), "x-request-id": b"\xff\xfe"})  # fmt: skip
        assert reply.status_code == 200, reply.text[:300]
        fresh = reply.headers["x-request-id"]
        assert fresh != "\xff\xfe" and str(uuid.UUID(fresh)) == fresh


def test_unfinished_headers_are_cut_by_the_ingress(stack: Stack) -> None:
    """HAProxy closes a connection whose request headers stop coming after its client timeout
    (`RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S`, 30 s here instead of Ray's hour)."""
    timeout_s = int(INGRESS_GUARDS[CLIENT_TIMEOUT])
    configs = list(Path(stack.head.temp_dir, "haproxy").rglob("haproxy.cfg"))
    assert configs and all(f"timeout client {timeout_s}s" in c.read_text() for c in configs)
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=timeout_s + 15) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                     f"{KEYS['team-a']}\r\n".encode())  # fmt: skip
        start = time.monotonic()
        answer = sock.recv(65536)
        took = time.monotonic() - start
    print(json.dumps({"unfinished_headers_cut_after_s": round(took, 1)}))
    assert answer.split(b" ", 2)[1] == b"408", answer[:200]
    assert timeout_s - 1 < took < timeout_s + 5


def test_chunked_body_over_the_limit_is_refused_unread(stack: Stack) -> None:
    def chunks() -> Any:
        yield b'{"model": "small", "messages": [{"role": "user", "content": "'
        for _ in range(3000):
            yield b"a" * 1000
        yield b'"}]}'

    reply = httpx.post(f"{stack.url}/v1/chat/completions", content=chunks(), timeout=60,
                       headers=auth())  # fmt: skip
    assert reply.status_code == 413


def test_a_body_that_never_arrives_is_cut_off(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                     f"{KEYS['team-a']}\r\ncontent-length: 100\r\n\r\n{{".encode())  # fmt: skip
        start = time.monotonic()
        answer = sock.recv(65536)
        assert answer.split(b" ", 2)[1] == b"408", answer[:200]
        assert time.monotonic() - start < 10


def test_only_health_answers_without_a_key(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/health", timeout=10).status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/info"), ("POST", "/generate"),
                         ("POST", "/"), ("POST", "/v1/completions")]:  # fmt: skip
        assert httpx.request(method, f"{stack.url}{path}", timeout=10).status_code == 401


def test_the_ingress_answers_its_own_paths_without_a_key(stack: Stack) -> None:
    """HAProxy answers `/-/healthz` and `/-/routes` itself, before any application code. The
    health check is what KubeRay's readiness probe and operator call (with no key); the route
    table holds each application's route prefix and name, nothing about tiers or keys."""
    health = httpx.get(f"{stack.url}/-/healthz", timeout=10)
    assert health.status_code == 200 and health.text == "success"
    routes = httpx.get(f"{stack.url}/-/routes", timeout=10)
    apps = local_config()["applications"]
    assert routes.json() == {app["route_prefix"]: app["name"] for app in apps}


def test_tgis_own_clients_with_no_model_and_a_validation_error(stack: Stack) -> None:
    client = InferenceClient(base_url=stack.url, api_key=KEYS["team-a"])
    chat = client.chat_completion(messages=QUESTION, max_tokens=4)  # sends model "dummy"
    assert chat.choices[0].message.content
    assert client.text_generation("The capital of France is", max_new_tokens=4)
    tgi = text_generation.Client(stack.url, headers=auth(), timeout=60)
    assert tgi.generate("Hi", max_new_tokens=2).generated_text is not None
    with pytest.raises(text_generation.errors.ValidationError, match="limit of 512"):
        tgi.generate("Hi", max_new_tokens=100_000)
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    reply = httpx.post(f"{stack.url}/generate", headers=auth(), timeout=60, json=body)
    pid, argv = next((p, a) for p, a in stack.engines().items() if "simulated" not in a)
    url = f"{engine_url(argv)}/generate"
    # The engine takes only its replica's own key: the router's, nobody else's.
    assert httpx.post(url, timeout=60, json=body, headers=auth()).status_code == 401
    assert httpx.post(url, timeout=60, json=body).status_code == 401
    engine_auth = {"authorization": f"Bearer {engine_key(pid)}"}
    direct = httpx.post(url, timeout=60, json=body, headers=engine_auth)
    sent = {k for k in direct.headers if k.startswith("x-") and k != "x-request-id"}
    print(json.dumps({"engine_headers": sorted(sent)}))
    assert sent <= set(reply.headers)  # whatever the engine sends comes through
    if "x-compute-time" in sent:  # an engine that speaks TGI's headers: all of them
        assert set(reply.headers) >= TGI_HEADERS
        assert int(reply.headers["x-generated-tokens"]) <= 2


TGI_HEADERS = {"x-compute-time", "x-total-time", "x-validation-time", "x-queue-time",
               "x-inference-time", "x-time-per-token", "x-prompt-tokens", "x-generated-tokens"}  # fmt: skip


# -- fuzz: no 5xx over every public route, keys on --------------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
FIELDS = {
    "model": st.sampled_from(["small", "large", "auto", "gpt-4o", "nope", ""]) | JSONISH,
    "messages": st.just(QUESTION) | JSONISH,
    "prompt": st.text(max_size=20) | JSONISH,
    "max_tokens": st.integers(-3, 4) | st.floats(-2, 5) | JSONISH,
    "temperature": st.floats(-1, 3) | JSONISH,
    "stream": st.booleans() | JSONISH,
    "stop": JSONISH,
    "n": st.integers(0, 3),
    "inputs": st.text(max_size=20) | JSONISH,
    "parameters": st.fixed_dictionaries({}, optional={"max_new_tokens": st.integers(-2, 3) | st.floats(-1, 4),
                                                      "temperature": st.floats(-1, 2)}) | JSONISH,
}  # fmt: skip
BODIES = st.fixed_dictionaries({}, optional=FIELDS) | JSONISH
ROUTES = st.sampled_from([("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                          ("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"),
                          ("GET", "/v1/models"), ("GET", "/v1/models/small"), ("GET", "/info"),
                          ("GET", "/health")])  # fmt: skip
HEADERS = st.fixed_dictionaries({}, optional={
    "x-tier": st.sampled_from(["small", "large", "nope", ""]),
    "authorization": st.sampled_from([f"Bearer {KEYS['team-a']}", f"Bearer {KEYS['small-only']}",
                                      "Bearer nope", "Basic x"]),
    # headers Serve's ingress reads: UTF-8 or not
    "x-request-id": st.sampled_from([b"trace-1", "\u00e9t\u00e9".encode(), b"\xff\xfe", b"\xc3"]),
    "x-session-id": st.sampled_from([b"conversation-1", b"\xff"]),
})  # fmt: skip
FUZZ_EXAMPLES = 5000


def test_fuzzed_requests_never_get_a_5xx(stack: Stack) -> None:
    client = httpx.Client(base_url=stack.url, timeout=60)
    seen: list[int] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(route=ROUTES, body=BODIES, raw=st.booleans(), headers=HEADERS)
    def one(route: tuple[str, str], body: Any, raw: bool, headers: dict[str, str | bytes]) -> None:
        content = json.dumps(body).encode()
        content = content[:-1] if raw else content
        headers = {"authorization": f"Bearer {KEYS['team-a']}", **headers}
        reply = client.request(route[0], route[1], content=content, headers=headers)
        seen.append(reply.status_code)
        assert reply.status_code < 500, (route, body, reply.text)

    start = time.monotonic()
    one()
    client.close()
    counts = {s: seen.count(s) for s in sorted(set(seen))}
    print(json.dumps({"fuzz_requests": len(seen), "seconds": round(time.monotonic() - start),
                      "statuses": counts}))  # fmt: skip
    assert len(seen) >= FUZZ_EXAMPLES and 200 in seen
