"""One JSON line per request, for a team's log pipeline: who asked (tenant and key id, never the
key), for what (`feature`), where it ran, how it ended, and the tokens as the engine counted
them. Written to the `serve_app.usage` logger at INFO, once per request on every exit
(answered, refused, failed, client gone), so that lines and requests are one to one.

Route it like any Python logger. Unless it was given handlers of its own, the router replica
writes the bare lines to the pod's log where there is one (`serve_app.pod_log`: on Kubernetes,
what `kubectl logs` shows), else to its process's standard output file (`to_stdout`): Ray keeps
it as the replica's `worker-*.out` log. Not through `sys.stdout`, which Serve turns into its own log
records, prefixed and held in a buffer of up to 1,000 records before they reach the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass

from .. import pod_log

logger = logging.getLogger("serve_app.usage")
FEATURE_HEADER = "x-feature"
_FEATURE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")


@dataclass(frozen=True)
class UsageRecord:
    time: float  # when the request ended, seconds since the epoch
    request_id: str | None
    key_id: str | None  # the first 12 hex digits of the key's SHA-256: enough to tell keys apart
    tenant: str | None
    feature: str | None
    route: str
    model: str | None  # the model name the client asked for
    tier: str | None  # None: refused before a tier was chosen
    status: int
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # to the first token (the whole answer when not streamed)
    duration_s: float

    def line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)


def feature(value: str | None) -> str | None:
    """The caller's `x-feature`, if it is a short plain name (else none: it is a log field and a
    label, never free text)."""
    if value is None or not _FEATURE.fullmatch(value):
        return None
    return value


def key_id(key_sha256: bytes) -> str:
    return key_sha256.hex()[:12]


def to_stdout() -> None:
    """Write the lines, bare and at once, to this process's standard output file (descriptor 1,
    whatever `sys.stdout` was made into), unless the logger has handlers already."""
    if logger.handlers:
        return
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if pod_log.attach(logger):  # on Kubernetes: the pod's log, what `kubectl logs` shows
        return
    # the handler holds the stream for the life of the process
    stream = open(os.dup(1), "w", buffering=1, encoding="utf-8")  # noqa: SIM115
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)


def write(record: UsageRecord) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info(record.line())


def now() -> float:
    return time.time()
