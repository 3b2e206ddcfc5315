"""One engine process and every process it starts: spawn, watch, terminate the whole tree.

TGI's launcher starts its router, download step and shards in process groups of their own, so
signalling the launcher's group is not enough: the tree is found through /proc and each group in
it is signalled. The engine also gets a parent-death signal, so that it is told to stop even when
the replica is killed with SIGKILL and cannot clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from .launcher import LaunchSpec

PR_SET_PDEATHSIG = 1
TAIL_LINES = 40
MAX_LINE = 65_536  # bytes of one output line kept; the rest of a longer line is dropped
CUT = b" ... (line cut)"
JSON_LEVEL = re.compile(r'"level"\s*:\s*"([A-Za-z]+)"')


def _stop_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live process, from /proc (zombies, dead and
    waiting to be reaped, left out)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry.name), int(fields[1]), int(fields[2])


def descendants(root: int) -> list[int]:
    """Every live process below `root`, from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in _processes():
        children.setdefault(ppid, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, ())]
        found += frontier
    return found


def members(group: int) -> list[int]:
    """Every live process in process group `group`, from /proc."""
    return [pid for pid, _, pgrp in _processes() if pgrp == group]


def signal_tree(pids: list[int], sig: int) -> None:
    """Signal each process and each process group among `pids`; vanished ones are skipped."""
    groups = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def log_line(raw: str) -> tuple[int, str]:
    """A launcher output line as (level, message); TGI's `--json-output` objects unpacked. A
    record cut short (`OutputLines`) is no longer JSON: it keeps its level, and its text."""
    try:
        record = json.loads(raw)
        message = str(record["fields"]["message"])
        return _level(str(record.get("level", "INFO"))), message
    except (ValueError, KeyError, TypeError):
        level = JSON_LEVEL.search(raw[:200]) if raw.startswith("{") else None
        return (_level(level.group(1)) if level else logging.INFO), raw


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.INFO


class OutputLines:
    """The engine's output cut into lines, whatever their length, with its secrets masked.

    Over-long lines (TGI joins a failed shard's whole stderr into one) keep their first
    `limit` bytes; a line-by-line reader would stop at the first one and leave the engine
    blocked on a full pipe."""

    def __init__(self, secrets: tuple[str, ...] = (), limit: int = MAX_LINE) -> None:
        self._secrets = tuple(s.encode() for s in secrets if s)
        self._limit = limit
        self._pending = b""
        self._skipping = False  # dropping the rest of a line already cut

    def feed(self, data: bytes) -> list[str]:
        *complete, self._pending = (self._pending + data).split(b"\n")
        out = []
        for raw in complete:
            if self._skipping:  # the rest of a cut line ends here
                self._skipping = False
                continue
            out.append(self._line(raw))
        if len(self._pending) > self._limit + 1024:  # + room for a secret across the cut
            if not self._skipping:
                out.append(self._line(self._pending, cut=True))
                self._skipping = True
            self._pending = b""
        return [line for line in out if line]

    def close(self) -> list[str]:
        rest, self._pending = self._pending, b""
        line = "" if self._skipping else self._line(rest)
        return [line] if line else []

    def _line(self, raw: bytes, cut: bool = False) -> str:
        """One line, secrets masked; `cut`: the rest of it is dropped (so may be a secret's)."""
        for secret in self._secrets:
            raw = raw.replace(secret, b"***")
        if cut or len(raw) > self._limit:
            raw = self._without_secret_start(raw[: self._limit]) + CUT
        return raw.decode(errors="replace").rstrip()

    def _without_secret_start(self, kept: bytes) -> bytes:
        """`kept` without the start of a secret that the cut split (masked instead)."""
        for secret in self._secrets:
            for n in range(len(secret) - 1, 3, -1):
                if kept.endswith(secret[:n]):
                    return kept[:-n] + b"***"
        return kept


class EngineProcess:
    """A started engine. `terminate()` is the only way it should end."""

    def __init__(self, spec: LaunchSpec, logger: logging.LoggerAdapter) -> None:
        self._spec = spec
        self._log = logger
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    async def start(self) -> None:
        self._log.info("starting engine: %s", self._spec.redacted())
        self._proc = await asyncio.create_subprocess_exec(
            *self._spec.argv,
            env=dict(self._spec.env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own group, apart from the replica's
            preexec_fn=_stop_with_parent,
        )
        self._pump = asyncio.create_task(self._forward_output(self._proc))

    async def _forward_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        lines = OutputLines(self._spec.secrets)
        while data := await proc.stdout.read(65_536):
            self._emit(lines.feed(data))
        self._emit(lines.close())

    def _emit(self, lines: list[str]) -> None:
        for line in lines:
            level, message = log_line(line)
            self.tail.append(message)
            self._log.log(level, "%s", message)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def wait(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._pump is not None:
            await asyncio.wait([self._pump], timeout=2)
        return code

    async def terminate(self, timeout_s: float) -> None:
        """SIGTERM the whole tree, wait up to `timeout_s` for the engine to drain, then SIGKILL
        whatever is left of the tree."""
        if self._proc is None:
            return
        tree = [self._proc.pid, *descendants(self._proc.pid)]
        if self.alive():
            signal_tree([self._proc.pid], signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
            except TimeoutError:
                self._log.warning("engine did not stop within %.0fs; killing it", timeout_s)
        survivors = [p for p in tree if _exists(p)]
        signal_tree(survivors, signal.SIGKILL)
        await self._proc.wait()
        # Children of an engine that died first are no longer below it, but still in its
        # process group (its own session, so the group's id is its pid): found in /proc, not
        # signalled by group id, which an unrelated process may hold once the group is empty.
        signal_tree(members(self._proc.pid), signal.SIGKILL)
        if self._pump is not None:
            self._pump.cancel()

    def kill_now(self) -> None:
        """Last resort without an event loop (interpreter exit): SIGKILL the whole tree."""
        if self._proc is not None and self._proc.returncode is None:
            signal_tree([self._proc.pid, *descendants(self._proc.pid)], signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
