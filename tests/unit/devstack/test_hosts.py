"""Free ports, live processes, and the engines and routers found among them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.hosts import (
    Process,
    engine_key,
    engine_url,
    free_port,
    live_processes,
    port_free,
    router_addresses,
    under,
)

ENGINE_ARGV = ["python", "-m", "serve_app.local_engine", "--hostname", "127.0.0.1",
               "--port", "41234", "--shard-uds-path", "/tmp/ray-abc/tier-small/engine"]  # fmt: skip


def test_free_port_keeps_a_free_preferred_port_and_avoids_a_taken_one() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port_free(taken)
        assert free_port(taken) != taken
    port = free_port()
    assert free_port(port) == port


def test_an_engines_url_is_its_hostname_and_port() -> None:
    assert engine_url(ENGINE_ARGV) == "http://127.0.0.1:41234"


def test_an_engine_belongs_to_the_replica_whose_tmpdir_holds_its_uds_path() -> None:
    assert under("/tmp/ray-abc", ENGINE_ARGV)
    assert not under("/tmp/ray-xyz", ENGINE_ARGV)
    assert not under("/tmp/ray-abc", ENGINE_ARGV[:6])


def test_argv_splits_the_nul_separated_command_line() -> None:
    assert Process(1, 1, b"python\0-m\0serve_app.local_engine\0").argv == [
        "python",
        "-m",
        "serve_app.local_engine",
    ]


def fake_proc(root: Path, pid: int, state: str, session: int, argv: bytes, env: bytes) -> None:
    entry = root / str(pid)
    entry.mkdir()
    # the command name may hold spaces and parentheses: fields are read after the last ")"
    (entry / "stat").write_text(f"{pid} (a (b) c) {state} 1 {pid} {session} 0 -1")
    (entry / "cmdline").write_bytes(argv)
    (entry / "environ").write_bytes(env)


def test_live_processes_leave_out_zombies_and_what_is_not_a_process(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "S", 7, b"ray\0start\0", b"")
    fake_proc(tmp_path, 11, "Z", 7, b"", b"")
    (tmp_path / "self").mkdir()
    (tmp_path / "12").mkdir()  # exited while being read: no stat
    assert live_processes(tmp_path) == [Process(10, 7, b"ray\0start\0")]


def test_live_processes_find_this_one_in_its_own_session() -> None:
    mine = [p for p in live_processes() if p.pid == os.getpid()]
    assert [p.session for p in mine] == [os.getsid(0)]


def test_a_child_started_in_its_own_session_is_found_there() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)  # fmt: skip
    try:
        found = [p for p in live_processes() if p.pid == child.pid]
        assert [p.session for p in found] == [child.pid]
    finally:
        child.kill()
        child.wait()


def test_an_engines_key_is_read_from_its_environment(tmp_path: Path) -> None:
    fake_proc(tmp_path, 20, "S", 20, b"", b"HOME=/tmp\0API_KEY=k-123=x\0")
    fake_proc(tmp_path, 21, "S", 21, b"", b"HOME=/tmp\0")
    assert engine_key(20, tmp_path) == "k-123=x"
    with pytest.raises(LookupError, match="21"):
        engine_key(21, tmp_path)


def test_router_addresses_are_the_router_replicas_haproxy_names(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy" / "node" / "haproxy.cfg"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        "backend llm\n"
        "    server SERVE_REPLICA_llm-router-abc 10.0.0.2:30001 check\n"
        "    server SERVE_REPLICA_llm-router-def 10.0.0.1:30002 check\n"
        "    server SERVE_REPLICA_llm-tier-small-x 10.0.0.3:30003 check\n"
    )
    assert router_addresses(str(tmp_path)) == ["10.0.0.1:30002", "10.0.0.2:30001"]
    assert router_addresses(str(tmp_path / "none")) == []
