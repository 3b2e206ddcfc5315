"""What runs on this machine: free ports, live processes, and the engines and routers among them.

Read from /proc and from the files Ray writes; used by the local stack, the tests and the
benchmarks alike.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens there, else a port the kernel picks."""
    if preferred is not None and port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Nothing listens on `port`, on any interface."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Process:
    """A live process: its id, its session's id and its raw, NUL-separated command line."""

    pid: int
    session: int
    cmdline: bytes

    @property
    def argv(self) -> list[str]:
        return [a.decode(errors="replace") for a in self.cmdline.split(b"\0") if a]


def live_processes(proc: Path = PROC) -> list[Process]:
    """Every process on this machine that has not exited (zombies left out)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found.append(Process(int(entry.name), int(fields[3]), cmdline))
    return found


def engine_processes() -> dict[int, list[str]]:
    """Every running local engine on this machine: pid -> argv."""
    return {p.pid: p.argv for p in live_processes() if "serve_app.local_engine" in p.argv}


def engine_url(argv: list[str]) -> str:
    """Where an engine started by a tier replica listens (`--hostname`, `--port`)."""
    host = argv[argv.index("--hostname") + 1]
    return f"http://{host}:{argv[argv.index('--port') + 1]}"


def engine_key(pid: int, proc: Path = PROC) -> str:
    """The engine's own API key, from its environment (`API_KEY`, as TGI's launcher reads it)."""
    for item in (proc / str(pid) / "environ").read_bytes().split(b"\0"):
        if item.startswith(b"API_KEY="):
            return item.split(b"=", 1)[1].decode()
    raise LookupError(f"engine {pid} has no API_KEY")


def under(tmpdir: str, argv: list[str]) -> bool:
    """The engine with this argv runs for a replica with TMPDIR=`tmpdir` (its private
    directory, `--shard-uds-path`, lies there)."""
    return "--shard-uds-path" in argv and argv[argv.index("--shard-uds-path") + 1].startswith(
        tmpdir
    )


def engines_under(tmpdir: str) -> dict[int, list[str]]:
    """Engines whose replica ran with TMPDIR=`tmpdir`.

    Found by argv rather than by parent, so an orphaned engine is found too.
    """
    return {pid: argv for pid, argv in engine_processes().items() if under(tmpdir, argv)}


ROUTER_SERVER = re.compile(r"server SERVE_REPLICA_llm-router\S* ([\d.]+:\d+)")


def router_addresses(ray_temp_dir: str) -> list[str]:
    """`host:port` of each router replica's own HTTP server (Serve's direct ingress), as the
    config of the head's HAProxy names them."""
    found: set[str] = set()
    for cfg in Path(ray_temp_dir, "haproxy").rglob("haproxy.cfg"):
        found |= set(ROUTER_SERVER.findall(cfg.read_text()))
    return sorted(found)
