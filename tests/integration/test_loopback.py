"""The local stack listens on loopback only: its engines (direct data path) and Ray's client
server take the node's address, which the local head sets to 127.0.0.1, so neither is
reachable on the machine's network address."""

from __future__ import annotations

import socket

import pytest

from devstack.hosts import engine_url

from .conftest import Stack, local_config


@pytest.fixture(scope="module")
def stack(ray_head: Stack) -> Stack:
    config = local_config()
    args = config["applications"][0]["args"]
    small = args["tiers"][0]
    small.pop("overflow_tier")
    small["replicas"] = {"min": 1, "max": 1}
    args["tiers"] = [small]
    args["router"]["auto_rules"] = []
    ray_head.deploy(config)
    return ray_head


def network_address() -> str:
    """This machine's address on its network (a UDP socket's route; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.123", 9))
        return probe.getsockname()[0]


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_engines_and_the_ray_client_server_listen_on_loopback_only(stack: Stack) -> None:
    lan = network_address()
    if lan.startswith("127."):
        pytest.skip("this machine has no network address besides loopback")
    (argv,) = stack.engines().values()
    host, port = engine_url(argv).removeprefix("http://").rsplit(":", 1)
    assert host == "127.0.0.1", argv
    assert accepts("127.0.0.1", int(port)) and not accepts(lan, int(port))
    client = stack.head.client_port
    assert accepts("127.0.0.1", client) and not accepts(lan, client)
