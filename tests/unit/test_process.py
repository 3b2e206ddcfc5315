"""Finding an engine's processes in /proc (`serve_app.engine.process`), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from serve_app.engine.process import descendants, members, signal_tree


def test_an_engines_children_are_found_below_it_and_in_its_group_after_it_died() -> None:
    # A leader in its own session (as engines are started) with two children.
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(descendants(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        children = descendants(leader.pid)
        assert len(children) == 2
        assert sorted(members(leader.pid)) == sorted([leader.pid, *children])
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        assert descendants(leader.pid) == []  # orphans: no longer below it
        assert sorted(members(leader.pid)) == sorted(children)  # still in its group
        signal_tree(members(leader.pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while members(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert members(leader.pid) == []
    finally:
        signal_tree(members(leader.pid), signal.SIGKILL)
        leader.kill()
        leader.wait()
