"""Replica choice, measured: load-aware vs Serve's default, prefix affinity vs load only.

    PYTHONPATH=. python bench/routing.py [--scenarios skew,prefix,unshared] [--duration 60]

Starts a Ray head and deploys three tiers of the same shape (`--replicas` replicas, each with a
simulated engine of `--slots` slots: a fixed time to first token, then one token every
`--itl-ms`; prefill costs `--prefill-us-per-token` per prompt token its prefix cache of
`--cache-tokens` does not hold):

    default   Serve's default replica choice (power of two choices on ongoing requests)
    load      engine-aware choice: lowest expected wait (`routing: {}`)
    prefix    the same plus prefix affinity (`routing: {prefix_affinity: true}`)

Each scenario sends the same seeded open-loop Poisson arrivals to the tiers it compares, one
tier after the other, streaming `/v1/completions`; time to first token (TTFT) is measured at
the client. Scenarios:

    skew      90 % short and 10 % long generations, short prompts: default vs load
    prefix    `--prefixes` long system prompts shared by many users: load vs prefix
    unshared  long prompts, none shared: load vs prefix (affinity must cost nothing)
    fairness  a fourth tier, `fair`, with an admission queue and two API keys: a light
              tenant's streamed requests alone, then while a heavy tenant sends
              `--heavy-factor` (10) times as many (non-streamed, longer) requests, more than
              the tier can serve; each request's wait for a turn (`x-admission-wait-ms`) splits
              its TTFT, and the machine's CPU use is recorded per run (`--fair-reserved 0`:
              without turns kept for tenants below their share)

Writes bench/results/routing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devstack import localstack
from devstack.hosts import free_port
from devstack.local_ray import Head

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@dataclass(frozen=True)
class Ask:
    at_s: float  # when to send, from the start
    prompt: str
    max_tokens: int
    tenant: str = ""
    stream: bool = True


@dataclass(frozen=True)
class Sample:
    ask: Ask
    ttft_s: float
    ok: bool
    wait_s: float | None = None  # the router's admission wait (`x-admission-wait-ms`), if any


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def skewed(rng: random.Random, rate: float, duration_s: float, short: int, long: int) -> list[Ask]:
    """Poisson arrivals; one in ten asks for a long generation."""
    asks, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration_s:
        tokens = long if rng.random() < 0.1 else short
        asks.append(Ask(t, f"question {len(asks)}: {words(rng, 8)}", tokens))
    return asks


def shared_prefix(rng: random.Random, rate: float, duration_s: float, prefixes: int,
                  prefix_words: int, tokens: int) -> list[Ask]:  # fmt: skip
    """Many users, each request under one of a few long system prompts."""
    systems = [f"system {i}: " + words(random.Random(i), prefix_words) for i in range(prefixes)]
    asks, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration_s:
        user = f" user {len(asks)} asks: {words(rng, 12)}"
        asks.append(Ask(t, rng.choice(systems) + user, tokens))
    return asks


def unshared(rng: random.Random, rate: float, duration_s: float, prompt_words: int,
             tokens: int) -> list[Ask]:  # fmt: skip
    asks, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration_s:
        asks.append(Ask(t, f"{len(asks)} {rng.random()} " + words(rng, prompt_words), tokens))
    return asks


async def one(client: httpx.AsyncClient, url: str, model: str, ask: Ask,
              headers: dict[str, str]) -> Sample:  # fmt: skip
    body = {"model": model, "prompt": ask.prompt, "max_tokens": ask.max_tokens,
            "stream": ask.stream}  # fmt: skip
    start = time.perf_counter()
    first: float | None = None
    ok, wait = False, None
    if not ask.stream:
        try:
            reply = await client.post(url, json=body, headers=headers)
            ok, wait = reply.status_code == 200, admission_wait(reply)
            return Sample(ask, time.perf_counter() - start, ok, wait)
        except httpx.HTTPError:
            return Sample(ask, time.perf_counter() - start, False)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as reply:
            ok, wait = reply.status_code == 200, admission_wait(reply)
            async for line in reply.aiter_lines():
                if first is None and line.startswith("data:") and "[DONE]" not in line:
                    first = time.perf_counter()
    except httpx.HTTPError:
        ok = False
    return Sample(ask, (first or time.perf_counter()) - start, ok and first is not None, wait)


def admission_wait(reply: httpx.Response) -> float | None:
    waited = reply.headers.get("x-admission-wait-ms")
    return None if waited is None else int(waited) / 1000


Headers = dict[str, dict[str, str]]  # tenant -> its request headers


async def replay(url: str, model: str, asks: list[Ask],
                 headers: Headers | None = None) -> tuple[list[Sample], float]:  # fmt: skip
    limits = httpx.Limits(max_connections=2048)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for ask in asks:
            delay = start + ask.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            extra = (headers or {}).get(ask.tenant, {})
            tasks.append(asyncio.create_task(one(client, url, model, ask, extra)))
        samples = list(await asyncio.gather(*tasks))
        return samples, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summary(samples: list[Sample], elapsed: float, skip_s: float = 0.0) -> dict[str, float]:
    """TTFT percentiles over requests sent after `skip_s` (warm-up), throughput over all; with
    an admission queue, TTFT split into the wait for a turn and the rest."""
    kept = [s for s in samples if s.ask.at_s >= skip_s]
    ttft = [s.ttft_s for s in kept if s.ok]
    row = {
        "requests": len(kept),
        "errors": sum(1 for s in kept if not s.ok),
        "ttft_p50_ms": round(pct(ttft, 0.5) * 1000, 1),
        "ttft_p90_ms": round(pct(ttft, 0.9) * 1000, 1),
        "ttft_p99_ms": round(pct(ttft, 0.99) * 1000, 1),
        "requests_per_s": round(sum(1 for s in samples if s.ok) / elapsed, 3),
    }
    waited = [s for s in kept if s.ok and s.wait_s is not None]
    if waited:
        for q in (50, 99):
            row[f"admission_wait_p{q}_ms"] = round(
                pct([s.wait_s or 0 for s in waited], q / 100) * 1000, 1
            )
            row[f"ttft_less_wait_p{q}_ms"] = round(
                pct([s.ttft_s - (s.wait_s or 0) for s in waited], q / 100) * 1000, 1
            )
        row["waited_at_all"] = sum(1 for s in waited if (s.wait_s or 0) > 0)
    return row


def tier(name: str, args: argparse.Namespace, routing: dict[str, Any] | None) -> dict[str, Any]:
    engine: dict[str, Any] = {
        "launcher": "local", "model_id": "simulated", "max_input_tokens": 6000,
        "max_total_tokens": 7000,
        "tuning": {"max_batch_size": args.slots, "max_concurrent_requests": 1024},
        "extra_args": ["--sim-ttft-ms", str(args.ttft_ms), "--sim-itl-ms", str(args.itl_ms),
                       "--sim-output-tokens", "100000",
                       "--sim-prefill-us-per-token", str(args.prefill_us_per_token),
                       "--sim-prefix-cache-tokens", str(args.cache_tokens)],
    }  # fmt: skip
    spec: dict[str, Any] = {
        "name": name, "engine": engine, "replicas": {"min": args.replicas, "max": args.replicas},
        "tuning": {"max_ongoing_requests": 1024, "max_queued_requests": -1},
        "default_max_tokens": 16, "max_tokens_limit": 4096,
    }  # fmt: skip
    if args.real:  # the real model: llama.cpp keeps each slot's last prompt (its prefix cache)
        spec["engine"] = {"launcher": "local", "max_input_tokens": 1536, "max_total_tokens": 2048,
                          "tuning": {"max_batch_size": args.slots, "threads": 1}}  # fmt: skip
        spec["max_tokens_limit"] = 256
    if routing is not None:
        prefill = args.prefill_us_per_token / 1000 / args.itl_ms
        cost = {"token_time_s": args.itl_ms / 1000, "prefill_token_fraction": prefill}
        spec["routing"] = {**routing, "tuning": {**cost, **routing.get("tuning", {})}}
    return spec


def fair_tier(args: argparse.Namespace) -> dict[str, Any]:
    spec = tier("fair", args, {})
    spec["engine"]["tuning"]["max_batch_size"] = args.fair_slots
    spec["replicas"] = {"min": args.fair_replicas, "max": args.fair_replicas}
    spec["admission"] = {"max_in_flight": args.fair_in_flight, "max_wait_s": 10,
                         "tuning": {"max_queued": 1024}}  # fmt: skip
    if args.fair_reserved is not None:
        spec["admission"]["tuning"]["reserved_turns"] = args.fair_reserved
    return spec


def cpu_ticks() -> tuple[int, int]:
    """The machine's (busy, all) CPU ticks so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


NEEDS = {"skew": ("default", "load"), "prefix": ("load", "prefix"),
         "unshared": ("load", "prefix"), "fairness": ("fair",)}  # fmt: skip


PREFIX_ROUTING = {"prefix_affinity": True, "tuning": {"prefix_chars": 512}}


def deploy_config(args: argparse.Namespace, http_port: int, keys_file: Path,
                  names: list[str]) -> dict[str, Any]:  # fmt: skip
    specs = {
        "default": lambda: tier("default", args, None),
        "load": lambda: tier("load", args, {}),
        "prefix": lambda: tier("prefix", args, PREFIX_ROUTING),
        "fair": lambda: fair_tier(args),
    }
    tiers = [specs[name]() for name in names]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{"name": "llm", "route_prefix": "/",
                          "import_path": "serve_app.app:build_app",
                          "args": {"router": {"tuning": {"max_body_bytes": 4_000_000},
                                            "api_keys": {"file": str(keys_file)}},
                                   "tiers": tiers}}],
    }  # fmt: skip


KEYS = {"light": "sk-light-tenant-0000000001", "heavy": "sk-heavy-tenant-0000000002"}
ANY_KEY = {"": {"authorization": f"Bearer {KEYS['light']}"}}  # scenarios without tenants


def fairness(url: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """The light tenant alone, then with the heavy one; the light tenant's asks are the same."""
    light, t = [], 0.0
    while (t := t + rng.expovariate(args.light_rate)) < args.duration:
        light.append(Ask(t, f"light {len(light)}: {words(rng, 8)}", args.short_tokens, "light"))
    heavy, t = [], 0.0
    while (t := t + rng.expovariate(args.light_rate * args.heavy_factor)) < args.duration:
        heavy.append(Ask(t, f"heavy {len(heavy)}: {words(rng, 8)}", args.heavy_tokens, "heavy",
                         stream=False))  # fmt: skip
    headers = {name: {"authorization": f"Bearer {key}"} for name, key in KEYS.items()}
    rows: dict[str, Any] = {}
    for label, asks in (("light_alone", light), ("light_with_heavy", sorted(
            light + heavy, key=lambda a: a.at_s))):  # fmt: skip
        busy, ticks = cpu_ticks()
        samples, took = asyncio.run(replay(url, "fair", asks, headers))
        busy_after, ticks_after = cpu_ticks()
        rows[f"{label}/cpu_busy"] = round((busy_after - busy) / (ticks_after - ticks), 3)
        print(f"  {label}/cpu_busy: {rows[f'{label}/cpu_busy']}", flush=True)
        for who in ("light", "heavy"):
            mine = [s for s in samples if s.ask.tenant == who]
            if mine:
                rows[f"{label}/{who}"] = summary(mine, took, args.duration / 5)
                print(f"  {label}/{who}: {json.dumps(rows[f'{label}/{who}'])}", flush=True)
    alone, shared = rows["light_alone/light"], rows["light_with_heavy/light"]
    rows["ratio_p99"] = round(shared["ttft_p99_ms"] / alone["ttft_p99_ms"], 3)
    rows["ratio_p50"] = round(shared["ttft_p50_ms"] / alone["ttft_p50_ms"], 3)
    return rows


def compare(url: str, asks: list[Ask], tiers: tuple[str, str], skip_s: float) -> dict[str, Any]:
    rows = {}
    for model in tiers:
        samples, took = asyncio.run(replay(url, model, asks, ANY_KEY))
        rows[model] = summary(samples, took, skip_s)
        print(f"  {model}: {json.dumps(rows[model])}", flush=True)
    base, new = (rows[t] for t in tiers)
    rows["ratio_p50"] = round(new["ttft_p50_ms"] / base["ttft_p50_ms"], 3)
    rows["ratio_p99"] = round(new["ttft_p99_ms"] / base["ttft_p99_ms"], 3)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--scenarios", default="skew,prefix,unshared,fairness")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=50.0)
    p.add_argument("--prefill-us-per-token", type=float, default=1000.0)
    p.add_argument("--cache-tokens", type=int, default=6000)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    p.add_argument("--skew-rate", type=float, default=3.6)
    p.add_argument("--short-tokens", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=100)
    p.add_argument("--prefix-rate", type=float, default=3.0)
    p.add_argument("--prefixes", type=int, default=16)
    p.add_argument("--prefix-words", type=int, default=1000)
    p.add_argument("--light-rate", type=float, default=2.0)
    p.add_argument("--heavy-tokens", type=int, default=64)
    p.add_argument("--heavy-factor", type=float, default=10.0, help="heavy rate / light rate")
    p.add_argument("--fair-replicas", type=int, default=2)
    p.add_argument("--fair-slots", type=int, default=24)
    p.add_argument("--fair-in-flight", type=int, default=48)
    p.add_argument("--fair-reserved", type=int, default=None,
                   help="the fair tier's reserved_turns (default: the config's)")  # fmt: skip
    p.add_argument(
        "--real",
        action="store_true",
        help="the real local model (one llama.cpp thread per replica) for every tier",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "routing.json"))
    args = p.parse_args()
    scenarios = args.scenarios.split(",")

    tmpdir = tempfile.mkdtemp(prefix="bench-routing-")
    env = localstack.ray_env()
    env["TMPDIR"] = tmpdir
    http_port = free_port()
    keys_file = Path(tmpdir) / "keys.json"
    keys_file.write_text(json.dumps([{"name": n, "key": k} for n, k in KEYS.items()]))
    config_path = Path(tmpdir) / "serve.json"
    names = [t for t in ("default", "load", "prefix", "fair")
             if any(t in NEEDS[sc] for sc in scenarios)]  # fmt: skip
    config_path.write_text(json.dumps(deploy_config(args, http_port, keys_file, names)))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "host": platform.node()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }  # fmt: skip
    head = localstack.start_head(Head.private(), env)
    try:
        localstack.deploy(config_path, head, env)
        localstack.wait_running(head, timeout_s=300)
        url = f"http://127.0.0.1:{http_port}/v1/completions"
        warm = [Ask(i * 0.05, f"warm {i}", 2) for i in range(12)]
        for model in names:
            asyncio.run(replay(url, model, warm, ANY_KEY))
        rng = random.Random(args.seed)
        skip = args.duration / 5
        if "skew" in scenarios:
            print("skew: default vs load", flush=True)
            asks = skewed(rng, args.skew_rate, args.duration, args.short_tokens, args.long_tokens)
            results["skew"] = compare(url, asks, ("default", "load"), skip)
        if "prefix" in scenarios:
            print("prefix: load vs prefix", flush=True)
            asks = shared_prefix(rng, args.prefix_rate, args.duration, args.prefixes,
                                 args.prefix_words, args.short_tokens)  # fmt: skip
            results["prefix"] = compare(url, asks, ("load", "prefix"), skip)
        if "unshared" in scenarios:
            print("unshared: load vs prefix", flush=True)
            asks = unshared(rng, args.prefix_rate, args.duration, args.prefix_words,
                            args.short_tokens)  # fmt: skip
            results["unshared"] = compare(url, asks, ("load", "prefix"), skip)
        if "fairness" in scenarios:
            print("fairness: light tenant alone vs with a heavy one", flush=True)
            results["fairness"] = fairness(url, args, rng)
    finally:
        localstack.stop_head(head)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
