"""The pod's own log: what `kubectl logs` shows.

Ray writes every worker's output to files under its session directory, which `kubectl logs`
never shows; a pod's log is the standard output of its first process (`ray start --block`).
Where `SERVE_APP_POD_LOG` names a file (the KubeRay manifests set `/proc/1/fd/1`, that first
process's standard output), the lines that explain a pod are written there as well, one
`write` per line: each engine's output and its supervisor's messages, prefixed with the tier and
replica, and the router's usage lines. Unset (the local stack), nothing changes.

A pod log that cannot be opened is reported once in the replica's own log and otherwise ignored:
serving never depends on it.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import TextIO

ENV = "SERVE_APP_POD_LOG"
ON_KUBERNETES = "/proc/1/fd/1"

logger = logging.getLogger("ray.serve")


@cache
def stream() -> TextIO | None:
    """The pod log, opened once per process (line-buffered), or None."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        # held for the life of the process, like the process's own stdout
        return open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    except OSError as exc:
        logger.warning("%s=%s cannot be opened (%s): lines go to Ray's logs only", ENV, path,
                       exc.strerror)  # fmt: skip
        return None


def attach(target: logging.Logger) -> bool:
    """Copy `target`'s records (their bare message) to the pod log; False where there is none."""
    out = stream()
    if out is None:
        return False
    if not any(getattr(h, "stream", None) is out for h in target.handlers):
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(message)s"))
        target.addHandler(handler)
    return True
