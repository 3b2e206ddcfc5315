"""Giving the load and the stack their own cores on one benchmark host.

In a deployment the clients run elsewhere and each engine is a GPU with its host's own cores;
on one benchmark host the load generator and the simulated engines share the cores with the
stack, so what the stack adds also counts the load generator and engines it slows down.
`CpuSplit` puts the load generator and the engines on the first cores and the stack (Ray,
HAProxy, routers, tier replicas) on the rest, so the direct side and the stack's side see the
same load generator and engines, and how busy each set of cores was is read from /proc/stat.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuSplit:
    """`load` cores for the load generator and the engines, `stack` cores for the rest."""

    load: tuple[int, ...]
    stack: tuple[int, ...]

    @classmethod
    def of(cls, cpus: Iterable[int], load_cpus: int) -> CpuSplit:
        ordered = tuple(sorted(cpus))
        if not 0 < load_cpus < len(ordered):
            raise ValueError(f"--load-cpus must be between 1 and {len(ordered) - 1}")
        return cls(ordered[:load_cpus], ordered[load_cpus:])

    def describe(self) -> dict[str, list[int]]:
        return {"load_and_engines": list(self.load), "stack": list(self.stack)}


def pin(pid: int, cpus: Sequence[int]) -> int:
    """Every thread of `pid` onto `cpus` (threads started later inherit it); threads pinned."""
    pinned = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, FileNotFoundError):
            continue  # the thread ended meanwhile
        pinned += 1
    return pinned


def per_cpu_times(stat: str) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU, from the text of /proc/stat."""
    times: dict[int, tuple[int, int]] = {}
    for line in stat.splitlines():
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        fields = [int(v) for v in values]
        idle = fields[3] + fields[4]  # idle + iowait
        times[int(name[3:])] = (sum(fields) - idle, sum(fields))
    return times


def busy_fraction(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: Iterable[int]
) -> float:
    """How busy `cpus` were together between two readings of `per_cpu_times`."""
    busy = total = 0
    for cpu in cpus:
        busy += after[cpu][0] - before[cpu][0]
        total += after[cpu][1] - before[cpu][1]
    return busy / max(1, total)


def read_per_cpu_times() -> dict[int, tuple[int, int]]:
    return per_cpu_times(Path("/proc/stat").read_text())
