"""How many tokens/s one simulated-engine process streams, against its timetable's ideal.

    PYTHONPATH=. python bench/sim_engine.py [--streams 1,64,256] [--processes 4] [--out FILE]

Starts one `--model-id simulated` engine process (the same one the tiers run), drives it with the
multi-process load generator in closed loop, and reports tokens/s, TTFT and inter-token latency
next to what the timetable allows (streams x tokens / (ttft + (tokens - 1) x itl) per second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.loadgen import Load, LoadGenerator, summary
from devstack.hosts import free_port


def start_engine(port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "serve_app.local_engine", "--model-id", "simulated",
            "--port", str(port), "--max-batch-size", "1024", "--max-concurrent-requests", "8192",
            "--sim-ttft-ms", str(args.ttft_ms), "--sim-itl-ms", str(args.itl_ms),
            "--sim-output-tokens", str(args.tokens)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the simulated engine did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3, help="requests per stream")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    port = free_port()
    engine = start_engine(port, args)
    gen = LoadGenerator(args.processes)
    load = Load((f"http://127.0.0.1:{port}/v1/chat/completions",), "tgi", args.tokens)
    per_stream = args.tokens / ((args.ttft_ms + (args.tokens - 1) * args.itl_ms) / 1000)
    rows = []
    try:
        gen.closed_loop(load, 8, 1)  # warm up
        for streams in [int(x) for x in args.streams.split(",")]:
            cpu0, wall0 = cpu_seconds(engine.pid), time.monotonic()
            stats = summary(gen.closed_loop(load, streams, args.requests), 0.2)
            cpu = (cpu_seconds(engine.pid) - cpu0) / (time.monotonic() - wall0)
            row = {"streams": streams, "ideal_tokens_per_s": streams * per_stream,
                   "engine_cpu_cores": cpu, **stats}  # fmt: skip
            rows.append(row)
            print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    finally:
        gen.close()
        engine.terminate()
        engine.wait(timeout=30)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
