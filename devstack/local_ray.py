"""A Ray head that one checkout owns: its own ports and temp dir, stopped by what it recorded.

`ray stop --force` stops every Ray process on the machine, a developer's other clusters and a
second checkout's test run included. Instead, every `ray start` made here runs in a process
session of its own (Ray's daemons and workers inherit it), and stopping signals exactly the
processes of the recorded sessions, plus any process whose command line names the head's private
temp dir (a worker that left the session still carries it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .hosts import free_port, live_processes

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Head:
    """Where a local Ray head listens, and the sessions of the processes it started."""

    gcs_port: int
    dashboard_port: int
    metrics_port: int  # Ray's Prometheus endpoint, as on KubeRay pods
    client_port: int
    agent_port: int
    temp_dir: str
    num_cpus: int = 2
    num_gpus: int = 0
    sessions: tuple[int, ...] = field(default=())
    # the node's address: loopback, or a network namespace's own (`devstack.cluster`)
    host: str = "127.0.0.1"

    @classmethod
    def private(cls, *, prefer_defaults: bool = False, **kwargs: int) -> Head:
        """Free ports (Ray's defaults where free, if `prefer_defaults`) and a fresh temp dir.

        Ray's socket paths must stay short, so the temp dir sits directly under /tmp.
        """

        def port(default: int) -> int:
            return free_port(default if prefer_defaults else None)

        return cls(
            gcs_port=port(6379),
            dashboard_port=port(8265),
            metrics_port=port(8080),
            client_port=port(10001),
            agent_port=port(52365),
            temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
            **kwargs,
        )

    @property
    def dashboard(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Head | None:
        try:
            fields = json.loads(path.read_text())
            fields["sessions"] = tuple(fields.get("sessions", ()))
            return cls(**fields)
        except (OSError, ValueError, TypeError):
            return None


LOOPBACK = "127.0.0.1"


def head_args(head: Head) -> list[str]:
    """`ray start --head` for this head: every port Ray would otherwise take by default, and
    the node's address (`host`: loopback unless a test's network namespace gives it another),
    so that what binds to it (Ray's client server, engines on the direct data path) is not
    reachable from the machine's network."""
    return [
        "--head",
        f"--node-ip-address={head.host}",
        f"--port={head.gcs_port}",
        f"--dashboard-host={head.host}", f"--dashboard-port={head.dashboard_port}",
        f"--ray-client-server-port={head.client_port}",
        f"--dashboard-agent-listen-port={head.agent_port}",
        f"--metrics-export-port={head.metrics_port}",
        f"--num-cpus={head.num_cpus}", f"--num-gpus={head.num_gpus}",
        f"--temp-dir={head.temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip


def ray_start(args: Iterable[str], env: Mapping[str, str], prefix: Sequence[str] = ()) -> int:
    """Run `ray start ARGS` in a new process session; returns that session's id. `prefix` runs
    it through another command (`ip netns exec NS`, `devstack.netns`)."""
    process = subprocess.Popen(
        [*prefix, str(BIN / "ray"), "start", *args],
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    _, err = process.communicate()
    if process.returncode != 0:
        stop_sessions([process.pid], None)
        reason = err.decode(errors="replace")
        raise RuntimeError(f"ray start failed ({process.returncode}):\n{reason}")
    return process.pid


def start_head(head: Head, env: Mapping[str, str]) -> Head:
    """Start the head; the returned `Head` records the session to stop later."""
    return replace(head, sessions=(*head.sessions, ray_start(head_args(head), env)))


def stop_head(head: Head, timeout_s: float = 15) -> None:
    """Stop this head's processes, and only those; its temp dir (logs) stays."""
    stop_sessions(head.sessions, head.temp_dir, timeout_s)


def stop_sessions(sessions: Iterable[int], temp_dir: str | None, timeout_s: float = 15) -> None:
    """SIGTERM every owned process, wait, SIGKILL what is left."""
    sessions = set(sessions)

    def owned() -> list[int]:
        return _owned(sessions, temp_dir)

    for pid in owned():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (left := owned()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while owned() and time.monotonic() < deadline:
        time.sleep(0.1)


def owned_processes(head: Head) -> list[int]:
    """The live processes `stop_head` would stop."""
    return _owned(set(head.sessions), head.temp_dir)


def _owned(sessions: set[int], temp_dir: str | None) -> list[int]:
    marker = temp_dir.encode() if temp_dir else None
    me = os.getpid()
    return [
        p.pid
        for p in live_processes()
        if p.pid != me and (p.session in sessions or (marker is not None and marker in p.cmdline))
    ]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
