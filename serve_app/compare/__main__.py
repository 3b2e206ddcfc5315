"""`python -m serve_app.compare --eval EVAL.jsonl --targets A,B [--out DIR]`: see the package."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from . import eval_set, plot, report, runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.compare",
        description="Send an eval set to two tiers through the stack and compare them.",
    )
    parser.add_argument("--eval", required=True, type=Path, help="JSONL eval set")
    parser.add_argument(
        "--targets", required=True, help="comma-separated tier names (the `model` clients send)"
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the stack's address")
    parser.add_argument(
        "--api-key-env",
        default="SERVE_APP_API_KEY",
        help="environment variable holding the API key, if the stack has keys on",
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64, help="unless a case sets its own")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--out", type=Path, default=Path("compare-results"), help="folder")
    parser.add_argument("--name", help="file name stem (default: the targets)")
    args = parser.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.target_list or len(set(args.target_list)) != len(args.target_list):
        parser.error("--targets: one or more distinct tier names, comma-separated")
    if args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--concurrency and --max-tokens are positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cases = eval_set.load(args.eval)
    except eval_set.EvalSetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = runner.RunSettings(
        url=args.url,
        api_key=os.environ.get(args.api_key_env) or None,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        timeout_s=args.timeout_s,
    )
    runs = asyncio.run(runner.run(args.target_list, cases, settings))
    meta = {
        "eval": args.eval.name,
        "url": args.url,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result = report.build(runs, cases, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "compare_" + "_vs_".join(args.target_list)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = report.markdown(result)
    (args.out / f"{stem}.md").write_text(table)
    drawn = plot.write(result, args.out / f"{stem}.png")
    print(table)
    print(f"written: {args.out / stem}.json, .md" + (", .png" if drawn else ""))
    if not drawn:
        print("no plot: matplotlib is not installed (pip install 'serve-app[bench]')")
    failed = all(t["errors"] == t["requests"] for t in result["targets"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
