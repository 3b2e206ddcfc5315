"""A file that is re-read when it changes: the API keys mounted from a Kubernetes Secret.

The kubelet updates a mounted Secret by swapping a symlink, and editors replace files rather than
rewrite them, so a change is recognised by the content's SHA-256, not by a modification time. The
file is looked at on use, at most once per `interval_s`: no thread or task to own, and a key added
to, rotated in or removed from the file takes effect within `interval_s` of the file changing.

A change that cannot be read or parsed keeps the last good value in use (the service keeps
answering) and is logged once, with the parser's reason and never the file's contents; each
reload's outcome goes to `on_reload` (for the API keys: a metric, so that a stale file pages
someone instead of failing open unnoticed).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Literal, TypeVar

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
Outcome = Literal["ok", "invalid", "unreadable"]


class ReloadingFile(Generic[T]):
    def __init__(
        self,
        path: Path,
        parse: Callable[[str], T],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_reload: Callable[[Outcome], None] = lambda outcome: None,
    ) -> None:
        """Read and parse `path` now: a file that is missing or invalid at start is an error."""
        self._path = path
        self._parse = parse
        self._interval_s = interval_s
        self._clock = clock
        self._on_reload = on_reload
        text = path.read_text()
        self._value = parse(text)
        self._digest = _sha256(text)
        self._checked = clock()
        on_reload("ok")

    def current(self) -> T:
        """The value of the file as it was at most `interval_s` ago."""
        now = self._clock()
        if now - self._checked >= self._interval_s:
            self._checked = now
            self._reload()
        return self._value

    def _reload(self) -> None:
        try:
            text = self._path.read_text()
        except OSError as exc:
            logger.error("keeping the last good %s: cannot read it (%s)", self._path, exc.strerror)
            self._on_reload("unreadable")
            return
        digest = _sha256(text)
        if digest == self._digest:
            return
        self._digest = digest  # a bad version is reported once, not at every look
        try:
            self._value = self._parse(text)
        except ValueError as exc:
            logger.error("keeping the last good %s: the new one is invalid: %s", self._path, exc)
            self._on_reload("invalid")
            return
        logger.info("reloaded %s", self._path)
        self._on_reload("ok")


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()
