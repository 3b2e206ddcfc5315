"""`python -m serve_app.status`: every tier's state as the router reports it (`GET /v1/status`).

    python -m serve_app.status [--url http://127.0.0.1:8000] [--api-key KEY] [--json]

The key comes from `--api-key`, else the `SERVE_APP_API_KEY` variable (a key sees its own
tiers). Exit status: 0 when every tier is ready (or idle: scaled to zero), 1 when one is not,
2 when the router could not be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

KEY_ENV = "SERVE_APP_API_KEY"
SERVING = {"ready", "idle"}

# What is printed under a tier's line, in order: each takes the tier's entry of `/v1/status`
# and gives lines (none when it has nothing to say).
Section = Callable[[dict[str, Any], float], list[str]]


def ago(since: float | None, now: float) -> str:
    if since is None:
        return "-"
    seconds = max(0, round(now - since))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def replica_lines(tier: dict[str, Any], now: float) -> list[str]:
    lines = []
    for replica in tier.get("replicas") or []:
        phase = replica.get("phase") or "-"
        line = (
            f"    replica {replica['replica']}: {replica.get('serve_state') or '-'}, phase {phase}"
        )
        if replica.get("since") is not None:
            line += f" for {ago(replica['since'], now)}"
        if replica.get("reason"):
            line += f": {replica['reason']}"
        lines.append(line)
    return lines


def reason_lines(tier: dict[str, Any], now: float) -> list[str]:
    reason = tier.get("reason")
    if not reason:
        return []
    first, *rest = str(reason).strip().splitlines() or [""]
    return [f"    reason: {first}", *(f"      {line}" for line in rest[-10:])]


def version_lines(tier: dict[str, Any], now: float) -> list[str]:
    """The stable version and a candidate: its weights, state, health and a rollback's reason."""
    versions = tier.get("versions")
    candidate = (versions or {}).get("candidate")
    if not candidate:
        return []
    stable = (versions.get("stable") or {}).get("version") or "stable"
    weight, shadow = candidate.get("weight_percent", 0), candidate.get("shadow_percent", 0)
    line = (
        f"    versions: {stable} (stable) {100 - weight:g} %, {candidate['version']} (candidate)"
        f" {weight:g} %, shadow {shadow:g} %"
    )
    if candidate.get("state"):
        line += f"; candidate {candidate['state']}"
    health = candidate.get("health") or {}
    if health.get("requests"):
        line += (
            f", {health['requests']} requests in its window, error rate"
            f" {health.get('error_rate', 0):.1%}"
        )
        if health.get("p99_s") is not None:
            line += f", p99 {health['p99_s']:.2f}s"
    lines = [line]
    rollback = candidate.get("rollback")
    if rollback:
        why = rollback.get("reason") or "no reason recorded"
        lines.append(f"    rolled back {ago(rollback.get('at'), now)} ago: {why}")
    return lines


SECTIONS: list[Section] = [reason_lines, version_lines, replica_lines]


def format_status(document: dict[str, Any], now: float | None = None) -> str:
    """`/v1/status` as text: one line per tier (state, for how long, replicas by phase), then
    each `SECTIONS`' lines."""
    now = time.time() if now is None else now
    tiers = document.get("tiers") or []
    if not tiers:
        return "no tiers"
    width = max(len(t["tier"]) for t in tiers)
    out = []
    for tier in tiers:
        replicas = tier.get("replicas") or []
        counts: dict[str, int] = {}
        for replica in replicas:
            key = replica.get("phase") or str(replica.get("serve_state") or "?").lower()
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{n} {phase}" for phase, n in counts.items()) or "no replicas"
        out.append(
            f"{tier['tier']:<{width}}  {tier['state']:<13}  for {ago(tier.get('since'), now):>4}"
            f"  {summary}"
        )
        for section in SECTIONS:
            out += section(tier, now)
    return "\n".join(out)


def fetch(url: str, api_key: str | None, timeout_s: float = 10) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.get(f"{url.rstrip('/')}/v1/status", headers=headers, timeout=timeout_s)
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:300]
        raise RuntimeError(f"{reply.status_code} from {url}: {message}")
    document: dict[str, Any] = reply.json()
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.status", description="Every tier's state, from the router."
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the router's address")
    parser.add_argument("--api-key", default=None, help=f"a key (default: ${KEY_ENV})")
    parser.add_argument("--json", action="store_true", help="print the router's JSON as it is")
    args = parser.parse_args(argv)
    try:
        document = fetch(args.url, args.api_key or os.environ.get(KEY_ENV) or None)
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        print(f"cannot read the status: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(document, indent=2) if args.json else format_status(document))
    states = {t.get("state") for t in document.get("tiers") or []}
    return 0 if states <= SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
