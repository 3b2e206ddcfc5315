"""The benchmark's split of the host's cores (`bench/cpus.py`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.cpus import CpuSplit, busy_fraction, per_cpu_times, pin

STAT = """cpu  300 0 100 1000 20 0 0 0 0 0
cpu0 100 0 50 400 10 0 0 0 0 0
cpu1 200 0 50 600 10 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def test_the_load_takes_the_first_cores_and_the_stack_the_rest() -> None:
    split = CpuSplit.of({3, 0, 2, 1}, 1)
    assert split == CpuSplit((0,), (1, 2, 3))
    assert split.describe() == {"load_and_engines": [0], "stack": [1, 2, 3]}


@pytest.mark.parametrize("load_cpus", [0, 4, 5])
def test_each_side_keeps_at_least_one_core(load_cpus: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 3"):
        CpuSplit.of(range(4), load_cpus)


def test_per_cpu_times_reads_each_cpu_and_leaves_the_total_out() -> None:
    assert per_cpu_times(STAT) == {0: (150, 560), 1: (250, 860)}


def test_busy_fraction_adds_up_the_chosen_cpus() -> None:
    before = {0: (100, 1000), 1: (100, 1000)}
    after = {0: (150, 1100), 1: (190, 1100)}
    assert busy_fraction(before, after, [0]) == pytest.approx(0.5)
    assert busy_fraction(before, after, [0, 1]) == pytest.approx(0.7)
    assert busy_fraction(before, before, [0]) == 0.0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_pin_moves_every_thread_of_a_running_process() -> None:
    code = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "print('up', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        target = min(os.sched_getaffinity(0))
        assert pin(proc.pid, [target]) == 2
        tasks = os.listdir(f"/proc/{proc.pid}/task")
        assert {frozenset(os.sched_getaffinity(int(t))) for t in tasks} == {frozenset({target})}
    finally:
        proc.kill()
        proc.wait()
