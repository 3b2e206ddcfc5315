"""Test helpers that touch real processes: finding engines, waiting for ports."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def router_addresses(ray_temp_dir: str) -> list[str]:
    """`host:port` of each router replica's own HTTP server (Serve's direct ingress), as the
    config of the head's HAProxy names them."""
    found: set[str] = set()
    for cfg in Path(ray_temp_dir, "haproxy").rglob("haproxy.cfg"):
        found |= set(
            re.findall(r"server SERVE_REPLICA_llm-router\S* ([\d.]+:\d+)", cfg.read_text())
        )
    return sorted(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_lines() -> dict[int, bytes]:
    """Every live process on this machine: pid -> its raw, NUL-separated command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if _alive(entry):
            found[int(entry.name)] = argv
    return found


def engine_processes() -> dict[int, list[str]]:
    """Every running local engine on this machine: pid -> argv."""
    found = {}
    for pid, raw in command_lines().items():
        args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if "serve_app.local_engine" in args:
            found[pid] = args
    return found


def engine_url(argv: list[str]) -> str:
    """Where an engine started by a tier replica listens (`--hostname`, `--port`)."""
    host = argv[argv.index("--hostname") + 1]
    return f"http://{host}:{argv[argv.index('--port') + 1]}"


def engine_key(pid: int) -> str:
    """The engine's own API key, from its environment (`API_KEY`, as TGI's launcher reads it)."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"API_KEY="):
            return item.split(b"=", 1)[1].decode()
    raise AssertionError(f"engine {pid} has no API_KEY")


def engines_under(tmpdir: str) -> dict[int, list[str]]:
    """Engines whose replica ran with TMPDIR=`tmpdir`: their private directory is in argv.

    Found by argv rather than by parent, so an orphaned engine is found too.
    """
    return {
        pid: argv
        for pid, argv in engine_processes().items()
        if "--shard-uds-path" in argv
        and argv[argv.index("--shard-uds-path") + 1].startswith(tmpdir)
    }


def _alive(proc: Path) -> bool:
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def metric_samples(metrics_port: int, name: str) -> dict[str, float]:
    """A metric's samples from Ray's metrics port: labels text -> value."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            found[labels] = float(value)
    return found


def lease_grants(metrics_port: int, tier: str) -> float:
    """Engine leases a tier's replicas have granted (`ray_serve_app_engine_lease_grants`)."""
    grants = metric_samples(metrics_port, "ray_serve_app_engine_lease_grants_total")
    return sum(v for labels, v in grants.items() if f'tier="{tier}"' in labels)


def settled_value(read: Callable[[], float], quiet_s: float = 25) -> float:
    """A counter once it has stopped changing for `quiet_s` (Ray exports every 10 s)."""
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value
