"""Finding an engine's processes in /proc (`serve_app.engine.process`), with real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

from serve_app.engine.launcher import LaunchSpec
from serve_app.engine.process import (
    CUT,
    TAIL_LINES,
    EngineProcess,
    OutputLines,
    descendants,
    log_line,
    members,
    signal_tree,
)


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


# -- the engine's output ----------------------------------------------------------------------


def test_output_lines_are_split_across_reads_and_secrets_masked() -> None:
    lines = OutputLines(("sk-engine-secret",), limit=64)
    assert lines.feed(b"first li") == []
    assert lines.feed(b"ne\nkey=sk-engine-") == ["first line"]
    assert lines.feed(b"secret here\n\nlast") == ["key=*** here"]
    assert lines.close() == ["last"]


def test_an_over_long_line_keeps_its_start_and_the_lines_after_it() -> None:
    lines = OutputLines(("sk-engine-secret",), limit=64)
    out = lines.feed(b"sk-engine-secret " + b"x" * 2000)
    assert out == ["*** " + "x" * 60 + CUT.decode()]
    assert lines.feed(b"y" * 5000) == []  # the rest of the cut line is dropped
    assert lines.feed(b"yyy\nnext\n") == ["next"]
    assert lines.close() == []


def test_a_secret_split_by_the_cut_is_masked_too() -> None:
    secret = "sk-" + "s" * 57
    lines = OutputLines((secret,), limit=64)
    # masking shortens the line, so the start of a secret at the end of what was read moves
    # inside the part kept
    (line,) = lines.feed((secret * 19 + secret[:6]).encode())
    assert line == "***" * 20 + CUT.decode()


def test_a_json_record_cut_short_keeps_its_level() -> None:
    record = json.dumps({"level": "ERROR", "fields": {"message": "Shard 0 failed: " + "e" * 200}})
    (line,) = OutputLines(limit=64).feed(record.encode() + b"\n")
    level, message = log_line(line)
    assert level == logging.ERROR and message.startswith('{"level": "ERROR"')
    assert log_line(record) == (logging.ERROR, "Shard 0 failed: " + "e" * 200)
    assert log_line("plain text") == (logging.INFO, "plain text")


def test_an_engine_printing_a_huge_line_is_still_read_to_its_end() -> None:
    """asyncio's line reader stops at 64 KiB; the engine would then block on a full pipe."""
    code = (
        "import os, sys\n"
        "sys.stdout.write('start with ' + os.environ['API_KEY'] + '\\n')\n"
        "sys.stdout.write('x' * 300_000 + '\\n')\n"
        "for i in range(2000): sys.stdout.write(f'line {i} ' + 'y' * 100 + '\\n')\n"
        "sys.stdout.write('done\\n')\n"
    )
    spec = LaunchSpec((sys.executable, "-c", code), {"API_KEY": "sk-0123456789", "PATH": ""})
    logged: list[str] = []
    logger = logging.getLogger("test_process.engine")
    logger.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    engine = EngineProcess(spec, logging.LoggerAdapter(logger, {}))

    async def run() -> int:
        await engine.start()
        return await asyncio.wait_for(engine.wait(), 20)

    try:
        assert asyncio.run(run()) == 0
    finally:
        logger.removeHandler(handler)
    assert list(engine.tail)[-1] == "done"
    assert len(engine.tail) == TAIL_LINES
    assert logged[1] == "start with ***"  # after the command line
    assert logged[2].startswith("x" * 100) and logged[2].endswith(CUT.decode())
    assert logged[-1] == "done" and len(logged) == 2 + 1 + 2000 + 1
    assert not any("sk-0123456789" in line for line in logged)
