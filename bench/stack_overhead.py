"""What the stack costs over a direct engine: the same engine process, measured both ways.

    python bench/stack_overhead.py [--concurrency 1,8,32,64] [--rates 20,50] [--rounds 3] [--real]

Starts a Ray head, deploys one tier on the simulated engine (no model compute: a fixed time to
first token, inter-token latency and length; `--real` adds a tier with the real model), finds that
tier's engine process, and sends the same streaming chat requests directly to the engine and
through the whole stack (Serve proxy → router → tier replica → engine), alternating sides each
round so machine noise hits both. Closed-loop concurrency sweeps and open-loop Poisson rates;
per request: time to first token (TTFT), inter-token latency (ITL), end-to-end latency, tokens.
Writes bench/results/stack_overhead.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx

from serve_app import localstack
from serve_app.localstack import Head
from tests.helpers import engines_under, free_port

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    itl_s: list[float]
    e2e_s: float
    tokens: int
    ok: bool


async def one_request(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> Sample:
    body = {"model": model, "messages": MESSAGES, "max_tokens": tokens, "stream": True}
    start = time.perf_counter()
    stamps: list[float] = []
    try:
        async with client.stream("POST", url, json=body) as reply:
            ok = reply.status_code == 200
            async for line in reply.aiter_lines():
                if line.startswith("data:") and '"content"' in line:
                    stamps.append(time.perf_counter())
    except httpx.HTTPError:
        ok = False
    end = time.perf_counter()
    ttft = stamps[0] - start if stamps else end - start
    return Sample(ttft, [b - a for a, b in pairwise(stamps)], end - start, len(stamps), ok)


async def closed_loop(url: str, model: str, concurrency: int, requests: int,
                      tokens: int) -> tuple[list[Sample], float]:  # fmt: skip
    samples: list[Sample] = []
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            for _ in remaining:
                samples.append(await one_request(client, url, model, tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.perf_counter() - start


async def open_loop(url: str, model: str, rate: float, duration_s: float, tokens: int,
                    seed: int) -> tuple[list[Sample], float]:  # fmt: skip
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=4096)) as client:
        tasks, start = [], time.perf_counter()
        while time.perf_counter() - start < duration_s:
            tasks.append(asyncio.create_task(one_request(client, url, model, tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        samples = list(await asyncio.gather(*tasks))
        return samples, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(samples: list[Sample], elapsed: float, slo_ttft_s: float) -> dict[str, float]:
    good = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in good]
    itl = [x for s in good for x in s.itl_s]
    tokens = sum(s.tokens for s in good)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(good),
        "ttft_p50_ms": pct(ttft, 0.5) * 1000,
        "ttft_p90_ms": pct(ttft, 0.9) * 1000,
        "ttft_p99_ms": pct(ttft, 0.99) * 1000,
        "itl_mean_ms": statistics.fmean(itl) * 1000 if itl else float("nan"),
        "itl_p99_ms": pct(itl, 0.99) * 1000,
        "e2e_p50_ms": pct([s.e2e_s for s in good], 0.5) * 1000,
        "requests_per_s": len(good) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "goodput_per_s": sum(1 for s in good if s.ttft_s <= slo_ttft_s) / elapsed,
    }


def compare(direct: dict[str, float], stack: dict[str, float]) -> dict[str, float]:
    return {
        "added_ttft_p50_ms": stack["ttft_p50_ms"] - direct["ttft_p50_ms"],
        "added_ttft_p99_ms": stack["ttft_p99_ms"] - direct["ttft_p99_ms"],
        "added_per_chunk_ms": stack["itl_mean_ms"] - direct["itl_mean_ms"],
        "throughput_ratio": stack["tokens_per_s"] / direct["tokens_per_s"],
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def tier(name: str, engine: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "engine": engine, "max_ongoing_requests": 1024,
            "default_max_tokens": 64, "max_tokens_limit": 512}  # fmt: skip


def deploy_config(args: argparse.Namespace, http_port: int) -> dict[str, Any]:
    sim = {"launcher": "local", "model_id": "simulated", "max_batch_size": 512,
           "max_concurrent_requests": 4096,
           "extra_args": ["--sim-ttft-ms", str(args.ttft_ms), "--sim-itl-ms", str(args.itl_ms),
                          "--sim-output-tokens", str(args.tokens)]}  # fmt: skip
    tiers = [tier("sim", sim)]
    if args.real:
        tiers.append(tier("real", {"launcher": "local", "threads": 1, "max_batch_size": 4}))
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{"name": "llm", "route_prefix": "/",
                          "import_path": "serve_app.app:build_app",
                          "args": {"tiers": tiers}}],
    }  # fmt: skip


def engine_url(tmpdir: str, model_id: str) -> str:
    for argv in engines_under(tmpdir).values():
        if argv[argv.index("--model-id") + 1] == model_id:
            return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}/v1/chat/completions"
    raise RuntimeError(f"no engine for {model_id}")


def ab(direct: str, stack: str, model: str, runs: int, measure: Any) -> dict[str, Any]:
    """Alternate direct and stack `runs` times; medians per side and the ratios."""
    sides: dict[str, list[dict[str, float]]] = {"direct": [], "stack": []}
    for i in range(runs):
        order = [("direct", direct), ("stack", stack)]
        for side, url in order if i % 2 == 0 else order[::-1]:
            sides[side].append(measure(url, model if side == "stack" else "tgi"))
    med = {side: median_of(r) for side, r in sides.items()}
    return {**med, "ratios": compare(med["direct"], med["stack"])}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["closed_loop"]
    xs = [row["concurrency"] for row in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for side, style in (("direct", "o-"), ("stack", "s-")):
        left.plot(xs, [r[side]["ttft_p50_ms"] for r in levels], style, label=f"{side} p50")
        left.plot(xs, [r[side]["ttft_p99_ms"] for r in levels], style, alpha=0.4,
                  label=f"{side} p99")  # fmt: skip
        right.plot(xs, [r[side]["tokens_per_s"] for r in levels], style, label=side)
    left.set(
        xscale="log", xlabel="concurrent streams", ylabel="TTFT (ms)", title="Time to first token"
    )
    right.set(xscale="log", xlabel="concurrent streams", ylabel="tokens/s", title="Throughput")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Stack vs direct engine (simulated model) — {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--rates", default="20,50", help="open-loop Poisson rates, requests/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="requests per stream per run")
    parser.add_argument("--duration", type=float, default=5.0, help="open-loop seconds per run")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slo-ttft-ms", type=float, default=200.0)
    parser.add_argument("--real", action="store_true", help="also measure the real model")
    args = parser.parse_args()

    tmpdir = tempfile.mkdtemp(prefix="bench-")
    env = localstack.ray_env()
    env["TMPDIR"] = tmpdir
    http_port = free_port()
    config_path = Path(tmpdir) / "serve.json"
    config_path.write_text(json.dumps(deploy_config(args, http_port)))
    head = localstack.start_head(Head.private(), env)
    try:
        localstack.deploy(config_path, head, env)
        localstack.wait_running(head, timeout_s=300)
        stack = f"http://127.0.0.1:{http_port}/v1/chat/completions"
        direct = engine_url(tmpdir, "simulated")
        slo = args.slo_ttft_ms / 1000
        results: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "simulated_engine": {
                "ttft_ms": args.ttft_ms,
                "itl_ms": args.itl_ms,
                "tokens": args.tokens,
            },
            "slo_ttft_ms": args.slo_ttft_ms,
            "rounds": args.rounds,
            "closed_loop": [],
            "open_loop": [],
        }
        asyncio.run(closed_loop(stack, "sim", 4, 8, args.tokens))  # warm both paths up
        asyncio.run(closed_loop(direct, "tgi", 4, 8, args.tokens))
        for c in [int(x) for x in args.concurrency.split(",")]:

            def measure(url: str, model: str, c: int = c) -> dict[str, float]:
                samples, took = asyncio.run(closed_loop(url, model, c, c * args.requests,
                                                        args.tokens))  # fmt: skip
                return summary(samples, took, slo)

            row = {"concurrency": c, **ab(direct, stack, "sim", args.rounds, measure)}
            results["closed_loop"].append(row)
            print(f"c={c}: {json.dumps(row['ratios'])}", flush=True)
        for rate in [float(x) for x in args.rates.split(",") if x]:

            def measure_rate(url: str, model: str, rate: float = rate) -> dict[str, float]:
                samples, took = asyncio.run(open_loop(url, model, rate, args.duration,
                                                      args.tokens, seed=int(rate)))  # fmt: skip
                return summary(samples, took, slo)

            row = {"rate_per_s": rate, **ab(direct, stack, "sim", args.rounds, measure_rate)}
            results["open_loop"].append(row)
            print(f"rate={rate}: {json.dumps(row['ratios'])}", flush=True)
        if args.real:
            real_direct = engine_url(tmpdir, "smollm2-135m-instruct")

            def measure_real(url: str, model: str) -> dict[str, float]:
                samples, took = asyncio.run(closed_loop(url, model, 4, 8, 64))
                return summary(samples, took, slo)

            real = ab(real_direct, stack, "real", args.rounds, measure_real)
            results["real_model"] = {"concurrency": 4, **real}
            print(f"real: {json.dumps(results['real_model']['ratios'])}", flush=True)
    finally:
        localstack.stop_head(head)
    out = ROOT / "bench" / "results" / "stack_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
