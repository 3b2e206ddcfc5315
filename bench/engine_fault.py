"""What clients see when an engine dies under load: failed requests, and for how long.

    PYTHONPATH=. python bench/engine_fault.py [--replicas 2] [--routers 2] [--rate 40]
        [--duration 30] [--kill-at 5] [--out FILE]

Starts a Ray head, deploys one tier of `--replicas` simulated engines behind `--routers` router
replicas (leases kept, as shipped), sends an open-loop Poisson load of streaming chat requests
through the stack, and `kill -9`s one engine `--kill-at` seconds in. Records every request's
status by the second it started (relative to the kill), the failures in all, the time from the
kill to the last failed request, and when the tier had all its engines again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.loadgen import Load, LoadGenerator, Result
from bench.stack_overhead import head_commit, tier
from devstack import localstack
from devstack.hosts import engines_under, free_port
from devstack.local_ray import Head

ROOT = Path(__file__).resolve().parents[1]


def deploy_config(args: argparse.Namespace, http_port: int) -> dict[str, Any]:
    sim = {"launcher": "local", "model_id": "simulated",
           "tuning": {"max_batch_size": 256, "max_concurrent_requests": 1024},
           "extra_args": ["--sim-ttft-ms", "20", "--sim-itl-ms", "10",
                          "--sim-output-tokens", str(args.tokens)]}  # fmt: skip
    leases = {"lease_reuse_s": 2.0, "lease_idle_s": 1.0, "lease_spare_s": 30.0}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{"name": "llm", "route_prefix": "/",
                          "import_path": "serve_app.app:build_app",
                          "args": {"router": {"replicas": args.routers},
                                   "tiers": [tier("sim", sim, args.replicas, "direct", leases)]}}],
    }  # fmt: skip


def outcome(result: Result, killed_at: float, restored_at: float | None) -> dict[str, Any]:
    """Statuses per second of start relative to the kill, and the failures' span."""
    by_second: dict[int, Counter[int]] = {}
    for s in result.samples:
        second = int((s.started_at - killed_at) // 1)
        by_second.setdefault(second, Counter())[s.status if not s.ok else 200] += 1
    failed = [s for s in result.samples if not s.ok]
    return {
        "requests": len(result.samples),
        "failed": len(failed),
        "failed_by_status": dict(Counter(s.status for s in failed)),
        "failure_examples": sorted({s.error[:160] for s in failed})[:5],
        "last_failure_after_kill_s": max((s.started_at - killed_at for s in failed), default=None),
        "all_engines_back_after_kill_s": None if restored_at is None else restored_at - killed_at,
        "statuses_by_second_after_kill": {str(k): dict(v) for k, v in sorted(by_second.items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--routers", type=int, default=2)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s, open loop")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--kill-at", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    out = args.out or ROOT / "bench" / "results" / f"engine_fault_{cpus}cpu.json"

    tmpdir = tempfile.mkdtemp(prefix="bench-")
    env = localstack.ray_env()
    env["TMPDIR"] = tmpdir
    http_port = free_port()
    config_path = Path(tmpdir) / "serve.json"
    config_path.write_text(json.dumps(deploy_config(args, http_port)))
    head = localstack.start_head(Head.private(num_cpus=max(cpus, 8)), env)
    gen = LoadGenerator(args.processes)
    try:
        localstack.deploy(config_path, head, env)
        localstack.wait_running(head, timeout_s=300)
        load = Load((f"http://127.0.0.1:{http_port}/v1/chat/completions",), "sim", args.tokens)
        gen.open_loop(load, args.rate, 3.0, seed=1)  # warm up: every router keeps leases
        engines = engines_under(tmpdir)
        assert len(engines) == args.replicas, engines
        results: list[Result] = []
        runner = threading.Thread(
            target=lambda: results.append(gen.open_loop(load, args.rate, args.duration, seed=2))
        )
        runner.start()
        time.sleep(args.kill_at)
        victim = min(engines)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        restored_at = None
        while runner.is_alive():
            now = engines_under(tmpdir)
            if restored_at is None and len(now) == args.replicas and victim not in now:
                restored_at = time.time()
            time.sleep(0.1)
        runner.join()
    finally:
        gen.close()
        localstack.stop_head(head)
    report = {
        "machine": {"cpus": cpus, "platform": platform.platform(),
                    "python": platform.python_version()},
        "commit": args.commit or head_commit(),
        "replicas": args.replicas, "routers": args.routers, "rate_per_s": args.rate,
        "duration_s": args.duration, "kill_at_s": args.kill_at,
        **outcome(results[0], killed_at, restored_at),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    brief = {k: v for k, v in report.items() if k != "statuses_by_second_after_kill"}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
