"""A Ray cluster of several nodes on this one machine, each node a host of its own.

Every node (the head and each worker) runs in a network namespace of its own with its own
address (`devstack.netns`), so Ray's processes and the engines its replicas start stay inside it:
killing a namespace's processes is what losing that node does to the rest of the cluster. The
head is started as the local stack starts it (`localstack.start_head`'s environment and HAProxy
ports, `local_ray.head_args`); workers join with `ray start --address`.

Used by the fault drill (tests/integration/test_node_drill.py; docs/operations.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from . import localstack
from .local_ray import Head, head_args, ray_start
from .netns import Host, Network


@dataclass
class Cluster:
    network: Network
    head: Head
    env: dict[str, str]

    @property
    def head_host(self) -> Host:
        return self.network.hosts[0]

    @property
    def workers(self) -> list[Host]:
        return self.network.hosts[1:]

    def node_of(self, address: str) -> int:
        """Which node (0: the head) has this address."""
        return [host.address for host in self.network.hosts].index(address)

    def destroy(self) -> None:
        """Every process of every node killed, the namespaces and links removed."""
        self.network.destroy()


def start(
    env: Mapping[str, str],
    *,
    workers: int = 2,
    head_cpus: int = 2,
    worker_cpus: int = 2,
    head_resources: Mapping[str, float] | None = None,
    worker_resources: Mapping[str, float] | None = None,
) -> Cluster:
    """A head and `workers` worker nodes, each in its own namespace; torn down on failure."""
    network = Network.create(1 + workers)
    try:
        host = network.hosts[0]
        head = replace(Head.private(num_cpus=head_cpus), host=host.address)
        # Several nodes, each on an address of its own: Ray's single-node loopback setting
        # (`localstack.SINGLE_NODE`) would refuse them.
        multi_node = {key: "1" for key in localstack.SINGLE_NODE}
        env = {**env, **localstack.ingress_env(head.temp_dir), **multi_node}
        args = [*head_args(head), f"--resources={json.dumps(dict(head_resources or {}))}"]
        head = replace(head, sessions=(ray_start(args, env, prefix=host.command([])),))
        for worker in network.hosts[1:]:
            ray_start(
                [
                    f"--address={head.address}",
                    f"--node-ip-address={worker.address}",
                    f"--num-cpus={worker_cpus}",
                    "--num-gpus=0",
                    f"--resources={json.dumps(dict(worker_resources or {}))}",
                    "--disable-usage-stats",
                ],
                env,
                prefix=worker.command([]),
            )
        return Cluster(network, head, env)
    except BaseException:
        network.destroy()
        raise
