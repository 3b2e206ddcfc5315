"""Hosts on one machine: Linux network namespaces on a bridge, each with an address of its own.

    net = Network.create(3)        # bridge 10.77.N.1/24, namespaces at .2, .3, .4
    net.hosts[0].run(["ip", "addr"])
    net.hosts[1].kill_all()        # SIGKILL every process in that namespace: a lost node
    net.destroy()                  # every process, namespace, link: gone

Every name carries a random suffix, so two networks (or a network a crashed run left behind)
never collide. Needs CAP_NET_ADMIN (root); `available()` says whether it is there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# 10.77.N.0/24: N is picked among the subnets no interface of this machine uses.
SUBNET_BASE = "10.77"


def _ip(*args: str, namespace: str | None = None) -> str:
    inside = [] if namespace is None else ["ip", "netns", "exec", namespace]
    command = [*inside, "ip", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """None when network namespaces can be made here, else the reason they cannot."""
    name = f"drill-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    except RuntimeError as error:
        return f"cannot create a network namespace (CAP_NET_ADMIN needed): {error}"
    with contextlib.suppress(RuntimeError):
        _ip("netns", "del", name)
    return None


@dataclass(frozen=True)
class Host:
    """One network namespace and its address on the bridge."""

    namespace: str
    address: str

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def run(
        self, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """`args` run in the namespace, their output captured."""
        environ = None if env is None else dict(env)
        return subprocess.run(self.command(args), env=environ, capture_output=True)

    def pids(self) -> list[int]:
        """Every live process in this namespace."""
        done = subprocess.run(
            ["ip", "netns", "pids", self.namespace], capture_output=True, text=True
        )
        return [int(p) for p in done.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    def kill_all(self, timeout_s: float = 10) -> int:
        """SIGKILL every process in the namespace (until none is left); how many were killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.1)
        return len(killed)


@dataclass
class Network:
    """A bridge in this (the root) namespace and one namespace per host, veth pairs between."""

    suffix: str
    bridge: str
    gateway: str  # the bridge's address: where processes of the root namespace appear from
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def create(cls, count: int) -> Network:
        suffix = secrets.token_hex(3)
        subnet = _free_subnet()
        net = cls(suffix, f"drb{suffix}", str(subnet.network_address + 1))
        try:
            _ip("link", "add", net.bridge, "type", "bridge")
            _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
            _ip("link", "set", net.bridge, "up")
            for index in range(count):
                net._add_host(index, str(subnet.network_address + 2 + index))
        except BaseException:
            net.destroy()
            raise
        return net

    def _add_host(self, index: int, address: str) -> None:
        namespace = f"drill-{self.suffix}-{index}"
        outside, inside = f"drv{self.suffix}{index}", f"drp{self.suffix}{index}"
        self.hosts.append(Host(namespace, address))  # from here on, `destroy` removes it
        _ip("netns", "add", namespace)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", "lo", "up", namespace=namespace)
        _ip("link", "set", inside, "name", "eth0", namespace=namespace)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
        _ip("link", "set", "eth0", "up", namespace=namespace)
        _ip("route", "add", "default", "via", self.gateway, namespace=namespace)

    def destroy(self) -> None:
        """Kill every process of every host, then remove the namespaces and links (idempotent)."""
        for host in self.hosts:
            host.kill_all()
        for host in self.hosts:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", host.namespace)
        for index in range(len(self.hosts)):
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", f"drv{self.suffix}{index}")
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", self.bridge)


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip("-4", "-o", "addr", "show")
    candidates = list(range(1, 255))
    random.shuffle(candidates)
    for third in candidates:
        if f" {SUBNET_BASE}.{third}." not in used:
            return ipaddress.IPv4Network(f"{SUBNET_BASE}.{third}.0/24")
    raise RuntimeError(f"no free subnet in {SUBNET_BASE}.0.0/16")
