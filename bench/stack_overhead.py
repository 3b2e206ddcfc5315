"""What the stack costs over its engines reached directly: one tier of N simulated engines.

    PYTHONPATH=. python bench/stack_overhead.py [--replicas 4] [--routers 2] [--processes 4]
        [--concurrency 1,8,64,256,512] [--rates 100,400] [--rounds 3] [--out FILE] [--real]

Starts a Ray head, deploys one tier of `--replicas` replicas on the simulated engine (no model
compute: a fixed time to first token, inter-token latency and length) behind `--routers` router
replicas, finds the tier's engine processes, and sends the same streaming chat requests
directly to those engines (round-robin) and through the whole stack (HAProxy → router → tier
replica → engine), alternating sides each round so machine noise hits both. The load comes from
`--processes` worker processes (bench/loadgen.py). Closed-loop concurrency sweeps (steady:
streams started evenly over one answer's length, then measured over `--closed-s` seconds; see
bench/loadgen.py) and open-loop Poisson rates; per request: time to first token (TTFT),
inter-token latency (ITL), tokens. Every run also records how busy the whole host's CPUs were
(`host_cpu_busy`, from /proc/stat): near 1.0 the host, not a hop, is the limit.

Where the time goes (`hops`): at 1 and 256 streams the stack's side is also measured through one
router replica's own port (HAProxy skipped), and the CPU seconds of every process of each hop
(HAProxy, router replicas, tier replicas, engines) are read from /proc around the run and
divided by the streamed chunks. Writes the JSON (default
bench/results/stack_overhead_<N>cpu.json) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cpus import CpuSplit, busy_fraction, pin, read_per_cpu_times
from bench.loadgen import Load, LoadGenerator, Result, error_examples, error_statuses, summary
from devstack import localstack
from devstack.hosts import engine_key, engine_url, engines_under, free_port, router_addresses
from devstack.local_ray import Head
from serve_app.serve_env import SERVE_TUNING

ROOT = Path(__file__).resolve().parents[1]
ROLES = {  # process role -> how its command line reads
    "haproxy": re.compile(rb"haproxy\x00"),
    "router": re.compile(rb"ServeReplica:llm:router"),
    "tier": re.compile(rb"ServeReplica:tier-"),  # each tier its own application
    "engine": re.compile(rb"serve_app\.local_engine"),
    "proxy": re.compile(rb"ray::ProxyActor"),
    "controller": re.compile(rb"ray::ServeController"),
    "ray": re.compile(rb"ray::|raylet|gcs_server|dashboard"),
}


def tier(name: str, engine: dict[str, Any], replicas: int, data_path: str,
         leases: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    return {"name": name, "engine": engine, "default_max_tokens": 64, "max_tokens_limit": 512,
            "replicas": {"min": replicas, "max": replicas},
            "tuning": {"max_ongoing_requests": 4096, "max_queued_requests": -1,
                       "data_path": data_path, **leases}}  # fmt: skip


def checked(result: Result, slo: float, label: str) -> dict[str, float]:
    """The summary; failed requests, by status, are printed where they happen."""
    failed = error_statuses(result)
    if failed:
        print(f"{label}: failed requests by status {failed}: {error_examples(result)}", flush=True)
    return summary(result, slo)


def leases(args: argparse.Namespace) -> dict[str, float]:
    """The tiers' lease settings (bench/results/HISTORY.md "Decision", point 5)."""
    return {"lease_reuse_s": args.lease_reuse_s, "lease_idle_s": args.lease_idle_s,
            "lease_spare_s": args.lease_spare_s}  # fmt: skip


def deploy_config(args: argparse.Namespace, http_port: int) -> dict[str, Any]:
    sim = {"launcher": "local", "model_id": "simulated",
           "tuning": {"max_batch_size": 1024, "max_concurrent_requests": 8192},
           "extra_args": ["--sim-ttft-ms", str(args.ttft_ms), "--sim-itl-ms", str(args.itl_ms),
                          "--sim-output-tokens", str(args.tokens)]}  # fmt: skip
    tiers = [tier("sim", sim, args.replicas, args.data_path, leases(args))]
    if args.real:
        real = {"launcher": "local", "tuning": {"threads": 1, "max_batch_size": 4}}
        tiers.append(tier("real", real, 1, args.data_path, leases(args)))
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{"name": "llm", "route_prefix": "/",
                          "import_path": "serve_app.app:build_app",
                          "args": {"router": {"replicas": args.routers}, "tiers": tiers}}],
    }  # fmt: skip


def engines(tmpdir: str, model_id: str, tokens: int) -> Load:
    """The tier's engines reached directly (round-robin), each with its own key."""
    found = {
        pid: argv
        for pid, argv in engines_under(tmpdir).items()
        if argv[argv.index("--model-id") + 1] == model_id
    }
    if not found:
        raise RuntimeError(f"no engine for {model_id}")
    urls = tuple(f"{engine_url(argv)}/v1/chat/completions" for argv in found.values())
    return Load(urls, "tgi", tokens, tuple(engine_key(pid) for pid in found))


def router_urls(head: Head) -> tuple[str, ...]:
    """Each router replica's own HTTP server, as HAProxy's config names them."""
    return tuple(f"http://{a}/v1/chat/completions" for a in router_addresses(head.temp_dir))


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by every live process of each role."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(ROLES, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for role, pattern in ROLES.items():
            if pattern.search(argv):
                totals[role] += (int(fields[11]) + int(fields[12])) / tick
                break
    return totals


def host_cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def with_host_cpu(run: Callable[[], Result], slo: float, label: str,
                  split: CpuSplit | None = None) -> dict[str, float]:  # fmt: skip
    """`run`'s summary and the fraction of the host's CPU time that was busy while it ran (and
    of each set of cores, when the load and the stack have their own)."""
    busy0, total0 = host_cpu_times()
    per_cpu0 = read_per_cpu_times()
    result = run()
    busy1, total1 = host_cpu_times()
    per_cpu1 = read_per_cpu_times()
    busy = {"host_cpu_busy": (busy1 - busy0) / max(1, total1 - total0)}
    if split is not None:
        busy["load_cpu_busy"] = busy_fraction(per_cpu0, per_cpu1, split.load)
        busy["stack_cpu_busy"] = busy_fraction(per_cpu0, per_cpu1, split.stack)
    return {**checked(result, slo, label), **busy}


def compare(direct: dict[str, float], stack: dict[str, float]) -> dict[str, float]:
    return {
        "added_ttft_p50_ms": stack["ttft_p50_ms"] - direct["ttft_p50_ms"],
        "added_ttft_p99_ms": stack["ttft_p99_ms"] - direct["ttft_p99_ms"],
        "added_itl_p99_ms": stack["itl_p99_ms"] - direct["itl_p99_ms"],
        "throughput_ratio": stack["tokens_per_s"] / max(direct["tokens_per_s"], 1e-9),
        "goodput_ratio": stack["goodput_per_s"] / max(direct["goodput_per_s"], 1e-9),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


Measure = Callable[[Load], dict[str, float]]


def ab(direct: Load, stack: Load, runs: int, measure: Measure) -> dict[str, Any]:
    """Alternate direct and stack `runs` times; medians per side and the comparisons."""
    sides: dict[str, list[dict[str, float]]] = {"direct": [], "stack": []}
    for i in range(runs):
        order = [("direct", direct), ("stack", stack)]
        for side, load in order if i % 2 == 0 else order[::-1]:
            sides[side].append(measure(load))
    med = {side: median_of(r) for side, r in sides.items()}
    return {**med, "vs_direct": compare(med["direct"], med["stack"])}


def pids_by_role() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {role: [] for role in ROLES}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            role = next((r for r, pattern in ROLES.items() if pattern.search(argv)), None)
            if role is not None:
                found[role].append(int(entry.name))
    return found


def start_profiles(py_spy: str, folder: Path, seconds: int) -> list[subprocess.Popen[bytes]]:
    """py-spy on one process of each Python hop, sampling while the load runs."""
    pids = pids_by_role()
    folder.mkdir(parents=True, exist_ok=True)
    profilers = []
    for role in ("router", "tier", "engine"):
        if pids[role]:
            out = folder / f"profile_{role}.txt"
            argv = [py_spy, "record", "--nonblocking", "-r", "200", "-d", str(seconds), "-f", "raw",
                    "-p", str(pids[role][0]), "-o", str(out)]  # fmt: skip
            profilers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))  # fmt: skip
    return profilers


def hops(gen: LoadGenerator, loads: dict[str, Load], streams: int, requests: int,
         slo: float, profile: Callable[[], list[subprocess.Popen[bytes]]] | None = None,
         ) -> dict[str, Any]:  # fmt: skip
    """One run per path at `streams`: TTFT/ITL per path, and CPU microseconds per streamed chunk
    of each role's processes; `profile` starts profilers for the stack's run."""
    out: dict[str, Any] = {"streams": streams}
    for path, load in loads.items():
        profilers = profile() if profile is not None and path == "stack" else []
        before = cpu_by_role()
        result = gen.closed_loop(load, streams, requests)
        for p in profilers:
            p.wait(timeout=60)
        after = cpu_by_role()
        chunks = max(1, sum(s.tokens for s in result.samples))
        cpu_us = {role: (after[role] - before[role]) / chunks * 1e6 for role in ROLES}
        out[path] = {**summary(result, slo), "chunks": chunks, "cpu_us_per_chunk": cpu_us}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["closed_loop"]
    xs = [row["concurrency"] for row in levels]
    rates = results["open_loop"]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.2))
    for side, style in (("direct", "o-"), ("stack", "s-")):
        left.plot(xs, [r[side]["ttft_p50_ms"] for r in levels], style, label=f"{side} p50")
        left.plot(xs, [r[side]["ttft_p99_ms"] for r in levels], style, alpha=0.4,
                  label=f"{side} p99")  # fmt: skip
        mid.plot(xs, [r[side]["tokens_per_s"] for r in levels], style, label=side)
        if rates:
            rx = [r["rate_per_s"] for r in rates]
            right.plot(rx, [r[side]["goodput_per_s"] for r in rates], style, label=side)
    left.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="TTFT (ms)",
             title="Time to first token (closed loop)")  # fmt: skip
    mid.set(xscale="log", xlabel="concurrent streams", ylabel="tokens/s",
            title="Throughput (closed loop)")  # fmt: skip
    right.set(xlabel="offered requests/s", ylabel="requests/s with TTFT ≤ SLO",
              title="Goodput (open loop)")  # fmt: skip
    for ax in (left, mid, right):
        ax.grid(alpha=0.3)
        ax.legend()
    m = results["machine"]
    fig.suptitle(f"Stack vs {results['replicas']} simulated engines direct — {m['cpus']} CPUs, "
                 f"{results['routers']} router replicas")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=4, help="tier replicas = engines")
    parser.add_argument("--routers", type=int, default=2, help="router replicas")
    parser.add_argument("--processes", type=int, default=4, help="load generator processes")
    parser.add_argument("--concurrency", default="1,8,64,256,512")
    parser.add_argument("--rates", default="100,400", help="open-loop Poisson rates, requests/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3,
                        help="requests per stream per burst run (hops)")  # fmt: skip
    parser.add_argument("--closed-s", type=float, default=4.0,
                        help="measured seconds per steady closed-loop run")  # fmt: skip
    parser.add_argument("--min-requests", type=int, default=32,
                        help="closed-loop runs last long enough to measure this many")  # fmt: skip
    parser.add_argument("--duration", type=float, default=5.0, help="open-loop seconds per run")
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slo-ttft-ms", type=float, default=200.0)
    parser.add_argument("--hop-streams", default="1,256", help="where to break the cost down")
    parser.add_argument("--real", action="store_true", help="also measure the real model")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--no-fast-ingress",
        action="store_true",
        help="without HAProxy and throughput-optimised Serve, for comparison",
    )
    parser.add_argument(
        "--data-path", choices=("direct", "relay"), default="direct", help="the tiers' data_path"
    )
    parser.add_argument(
        "--lease-reuse-s", type=float, default=2.0,
        help="the tiers' lease_reuse_s (0: a lease per request)",
    )  # fmt: skip
    parser.add_argument("--lease-idle-s", type=float, default=1.0, help="the tiers' lease_idle_s")
    parser.add_argument("--lease-spare-s", type=float, default=30.0, help="tiers' lease_spare_s")
    parser.add_argument("--py-spy", default=None, help="profile the hops with this py-spy")
    parser.add_argument("--commit", default=None, help="recorded with the results (git's HEAD)")
    parser.add_argument(
        "--ray-env", action="append", default=[], metavar="KEY=VALUE", type=key_value,
        help="an extra environment variable for every Ray process (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--load-cpus", type=int, default=0,
        help="put the load generator and the engines on this many cores, the stack on the rest "
        "(0: all share every core)",
    )  # fmt: skip
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    split = CpuSplit.of(os.sched_getaffinity(0), args.load_cpus) if args.load_cpus else None
    out = args.out or ROOT / "bench" / "results" / f"stack_overhead_{cpus}cpu.json"

    tmpdir = tempfile.mkdtemp(prefix="bench-")
    env = localstack.ray_env()
    env["TMPDIR"] = tmpdir
    extra_env = dict(args.ray_env)
    env.update(extra_env)
    if args.no_fast_ingress:
        env.pop("RAY_SERVE_ENABLE_HA_PROXY")
        env.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED")
    http_port = free_port()
    config_path = Path(tmpdir) / "serve.json"
    config_path.write_text(json.dumps(deploy_config(args, http_port)))
    if split is not None:
        os.sched_setaffinity(0, split.stack)  # Ray's processes, and the engines' parents
    head = localstack.start_head(Head.private(num_cpus=max(cpus, 8)), env)
    if split is not None:
        os.sched_setaffinity(0, split.load)  # the load generator's processes
    gen = LoadGenerator(args.processes)
    slo = args.slo_ttft_ms / 1000
    results: dict[str, Any] = {
        "machine": {"cpus": cpus, "platform": platform.platform(),
                    "python": platform.python_version()},
        "commit": args.commit or head_commit(),
        "ingress": {k: v for k, v in env.items() if k in SERVE_TUNING},
        "replicas": args.replicas, "routers": args.routers, "data_path": args.data_path,
        **leases(args),
        "load_processes": args.processes,
        "simulated_engine": {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms,
                             "tokens": args.tokens},
        "slo_ttft_ms": args.slo_ttft_ms, "rounds": args.rounds,
        "closed_loop_method": f"steady: streams started over one answer, {args.closed_s} s "
                              f"measured per run (longer where fewer than {args.min_requests} "
                              "requests would end in it)",
        "ray_env_extra": extra_env,
        "cpu_split": split.describe() if split is not None else None,
        "closed_loop": [], "open_loop": [], "hops": [],
    }  # fmt: skip
    try:
        localstack.deploy(config_path, head, env)
        localstack.wait_running(head, timeout_s=300)
        stack = Load((f"http://127.0.0.1:{http_port}/v1/chat/completions",), "sim", args.tokens)
        direct = engines(tmpdir, "simulated", args.tokens)
        if split is not None:
            for pid in engines_under(tmpdir):
                pin(pid, split.load)
        routers = Load(router_urls(head) or stack.urls, "sim", args.tokens)
        results["engines"] = len(direct.urls)
        gen.closed_loop(stack, 16, 2)  # warm both paths up
        gen.closed_loop(direct, 16, 2)
        answer_s = (args.ttft_ms + (args.tokens - 1) * args.itl_ms) / 1000  # the ramp
        for c in [int(x) for x in args.concurrency.split(",") if x]:
            window = max(args.closed_s, args.min_requests * answer_s / c)

            def measure(load: Load, c: int = c, window: float = window) -> dict[str, float]:
                return with_host_cpu(
                    lambda: gen.steady_loop(load, c, window, answer_s), slo, f"c={c}", split
                )

            row = {"concurrency": c, **ab(direct, stack, args.rounds, measure)}
            results["closed_loop"].append(row)
            print(f"c={c}: {_brief(row)}", flush=True)
        for rate in [float(x) for x in args.rates.split(",") if x]:

            def measure_rate(load: Load, rate: float = rate) -> dict[str, float]:
                return with_host_cpu(
                    lambda: gen.open_loop(load, rate, args.duration, seed=int(rate)),
                    slo, f"rate={rate}", split,
                )  # fmt: skip

            row = {"rate_per_s": rate, **ab(direct, stack, args.rounds, measure_rate)}
            results["open_loop"].append(row)
            print(f"rate={rate}: {_brief(row)}", flush=True)
        for streams in [int(x) for x in args.hop_streams.split(",") if x]:
            loads = {"direct": direct, "router_port": routers, "stack": stack}
            profile = None
            if args.py_spy and streams == max(int(x) for x in args.hop_streams.split(",")):

                def profile() -> list[subprocess.Popen[bytes]]:
                    return start_profiles(args.py_spy, out.parent, 6)

            row = hops(gen, loads, streams, args.requests, slo, profile)
            results["hops"].append(row)
            print(f"hops at {streams}: " + json.dumps(
                {p: {k: round(v, 1) for k, v in row[p]["cpu_us_per_chunk"].items()}
                 for p in loads}), flush=True)  # fmt: skip
        if args.real:
            real = engines(tmpdir, "smollm2-135m-instruct", 64)

            def measure_real(load: Load) -> dict[str, float]:
                return summary(gen.closed_loop(load, 4, 2), slo)

            real_stack = Load(stack.urls, "real", 64)
            results["real_model"] = {"concurrency": 4,
                                     **ab(real, real_stack, args.rounds, measure_real)}  # fmt: skip
            print(f"real: {_brief(results['real_model'])}", flush=True)
    finally:
        gen.close()
        localstack.stop_head(head)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if results["closed_loop"] or results["open_loop"]:
        plot(results, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out}")
    return 0


def key_value(text: str) -> tuple[str, str]:
    """`--ray-env`'s KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _brief(row: dict[str, Any]) -> str:
    d, s, v = row["direct"], row["stack"], row["vs_direct"]
    return (f"TTFT p50 {d['ttft_p50_ms']:.1f}/{s['ttft_p50_ms']:.1f} ms, "
            f"p99 {d['ttft_p99_ms']:.1f}/{s['ttft_p99_ms']:.1f}, "
            f"ITL p99 {d['itl_p99_ms']:.1f}/{s['itl_p99_ms']:.1f}, "
            f"tok/s {d['tokens_per_s']:.0f}/{s['tokens_per_s']:.0f}, "
            f"goodput {d['goodput_per_s']:.1f}/{s['goodput_per_s']:.1f}, "
            f"errors {d['errors']:.0f}/{s['errors']:.0f} | "
            + json.dumps({k: round(x, 3) for k, x in v.items()}))  # fmt: skip


def head_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT, check=False).stdout.strip()  # fmt: skip
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
