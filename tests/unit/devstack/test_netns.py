from __future__ import annotations

import pytest

from devstack import netns
from devstack.netns import Host, Network


def test_a_host_runs_commands_inside_its_namespace() -> None:
    host = Host("drill-abc-1", "10.77.3.3")
    assert host.command(["ray", "start"]) == ["ip", "netns", "exec", "drill-abc-1", "ray", "start"]


def test_a_subnet_no_interface_uses_is_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = "".join(f"9: br inet 10.77.{n}.1/24 scope global\n" for n in range(1, 255) if n != 42)
    monkeypatch.setattr(netns, "_ip", lambda *args, **kwargs: taken)
    assert str(netns._free_subnet()) == "10.77.42.0/24"
    monkeypatch.setattr(netns, "_ip", lambda *args, **kwargs: taken + " inet 10.77.42.1/24\n")
    with pytest.raises(RuntimeError, match="no free subnet"):
        netns._free_subnet()


def test_a_network_half_made_is_torn_down(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def ip(*args: str, namespace: str | None = None) -> str:
        calls.append(args)
        if args[:2] == ("netns", "add"):
            raise RuntimeError("ip netns add failed: Operation not permitted")
        return ""

    monkeypatch.setattr(netns, "_ip", ip)
    with pytest.raises(RuntimeError, match="not permitted"):
        Network.create(2)
    assert calls[-1][:2] == ("link", "del") and calls[-1][2].startswith("drb")


def test_without_the_right_to_make_namespaces_the_reason_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def ip(*args: str, namespace: str | None = None) -> str:
        raise RuntimeError("ip netns add failed: Operation not permitted")

    monkeypatch.setattr(netns, "_ip", ip)
    assert "CAP_NET_ADMIN" in (netns.available() or "")
