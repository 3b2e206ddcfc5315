"""Continuous batching of the local engine, against raw llama.cpp in the same run.

    python bench/engine_batching.py [--streams 8] [--tokens 64] [--rounds 3]

Measures aggregate generated tokens/s with 1 and with N concurrent streams, through the engine's
HTTP API (`/generate_stream`) and through `xllamacpp` called in-process with the same slots,
prompts and greedy decoding. Rounds interleave the four cases so that machine noise hits all of
them; the report gives medians and the ratios. Writes bench/results/engine_batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from serve_app.local_engine.model import resolve_gguf

ROOT = Path(__file__).resolve().parents[1]
# Counting keeps greedy decoding going for the whole budget, so both sides generate the same
# number of tokens without an end-of-sequence cut.
PROMPTS = [", ".join(str(k + i) for i in range(6)) + "," for k in (1, 10, 20, 30, 40, 50, 60, 70)]


async def engine_round(url: str, streams: int, tokens: int) -> float:
    async def one(client: httpx.AsyncClient, prompt: str) -> int:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens}}
        count = 0
        async with client.stream("POST", "/generate_stream", json=body) as reply:
            async for line in reply.aiter_lines():
                count += line.startswith("data:")
        return count

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(client, PROMPTS[i % 8]) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - start)


def raw_round(server: Any, streams: int, tokens: int) -> float:
    counts = [0] * streams

    def one(i: int) -> None:
        def on_chunk(chunk: dict[str, Any]) -> bool:
            content = (chunk["choices"][0].get("logprobs") or {}).get("content") or ()
            counts[i] += len(content)
            return False

        # What the engine asks of llama.cpp for a TGI request: greedy, one log-probability.
        payload = {"prompt": PROMPTS[i % 8], "max_tokens": tokens, "temperature": 0.0,
                   "stream": True, "logprobs": 1}  # fmt: skip
        server.handle_completions(payload, on_chunk)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="llama.cpp threads on both sides; below the core count leaves room for HTTP",
    )  # fmt: skip
    args = parser.parse_args()

    import xllamacpp

    engine = subprocess.Popen(
        [sys.executable, "-m", "serve_app.local_engine", "--port", str(args.port),
         "--max-batch-size", str(args.streams), "--max-total-tokens", "1024",
         "--max-input-tokens", "512", "--threads", str(args.threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        params = xllamacpp.CommonParams()
        params.model.path = str(resolve_gguf("smollm2-135m-instruct"))
        params.n_parallel = args.streams
        params.n_ctx = args.streams * 1024
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
        params.hostnames = [f"/tmp/bench-raw-{os.getpid()}.sock"]
        raw = xllamacpp.Server(params)
        results: dict[str, list[float]] = {
            k: [] for k in ("engine_1", "engine_n", "raw_1", "raw_n")
        }
        for _ in range(args.rounds):
            results["engine_1"].append(asyncio.run(engine_round(url, 1, args.tokens)))
            results["raw_1"].append(raw_round(raw, 1, args.tokens))
            results["engine_n"].append(asyncio.run(engine_round(url, args.streams, args.tokens)))
            results["raw_n"].append(raw_round(raw, args.streams, args.tokens))
    finally:
        engine.terminate()
        engine.wait(60)
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "streams": args.streams,
        "llama_threads": args.threads,
        "max_new_tokens": args.tokens,
        "rounds": args.rounds,
        "tokens_per_s_median": med,
        "tokens_per_s_all": results,
        "batching_gain_engine": med["engine_n"] / med["engine_1"],
        "batching_gain_raw": med["raw_n"] / med["raw_1"],
        "engine_vs_raw_1_stream": med["engine_1"] / med["raw_1"],
        "engine_vs_raw_n_streams": med["engine_n"] / med["raw_n"],
    }
    out = ROOT / "bench" / "results" / f"engine_batching_threads{args.threads}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "tokens_per_s_all"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
