"""The environment of a local stack's Ray processes: Ray's fast ingress, one head's own ports."""

from __future__ import annotations

from pathlib import Path

from devstack import localstack
from serve_app.kuberay import RAY_ENV
from serve_app.serve_env import CLIENT_TIMEOUT, INGRESS_GUARDS

FAST_INGRESS = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def test_every_ray_process_gets_the_fast_ingress() -> None:
    env = localstack.ray_env({"PATH": "/usr/bin"})
    assert FAST_INGRESS.items() <= env.items()
    assert FAST_INGRESS.items() <= {e["name"]: e["value"] for e in RAY_ENV}.items()


def test_two_heads_never_share_haproxy_ports_or_files(tmp_path: Path) -> None:
    one = localstack.ingress_env(str(tmp_path / "one"))
    two = localstack.ingress_env(str(tmp_path / "two"))
    assert set(one) == set(two) >= set(localstack.INGRESS_PORTS)
    for name in localstack.INGRESS_PORTS:
        assert one[name] != two[name] and int(one[name]) > 0, name
    paths = [value for name, value in one.items() if name not in localstack.INGRESS_PORTS]
    assert paths and all(Path(v).is_relative_to(tmp_path / "one" / "haproxy") for v in paths)
    # a Unix socket address holds 108 bytes, and Ray adds a 57-character node directory
    assert len(localstack.ingress_env("/tmp/ray-abcdefgh")["RAY_SERVE_HAPROXY_SOCKET_PATH"]) < 60


def test_ray_env_guards_serve_s_ingress_and_keeps_a_client_timeout_already_set() -> None:
    env = localstack.ray_env({"PATH": "/usr/bin"})
    assert INGRESS_GUARDS.items() <= env.items()
    assert env["PATH"] == f"{localstack.BIN}:/usr/bin"
    assert localstack.ray_env({"PATH": "/usr/bin", CLIENT_TIMEOUT: "12"})[CLIENT_TIMEOUT] == "12"


def test_the_local_node_takes_loopback_for_its_address() -> None:
    """What binds to the node's address (Ray's client server, engines on the direct data path)
    is then on 127.0.0.1; Ray would otherwise swap a loopback `--node-ip-address` for the
    machine's network address."""
    env = localstack.ray_env({"PATH": "/usr/bin"})
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
