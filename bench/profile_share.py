"""Where a router's CPU goes, from a py-spy profile in collapsed stacks (`--py-spy` of
bench/stack_overhead.py writes one per Python hop):

    python bench/profile_share.py bench/results/profiles/chunk_2cpu/router_64streams_*.txt

Each sample goes to the first kind of work below that its stack matches; prints a markdown row
per kind with its share of the samples.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

Test = Callable[[str, str], bool]  # (leaf frame, whole stack) -> matches


def _any(*words: str) -> Test:
    return lambda leaf, stack: any(w in stack for w in words)


EVENT = ("openai_events (", "Normaliser", "json_event", "Splicer", "_openai_tokens")
READ = ("aiohttp", "EventSplitter", "sse_batches", "EngineClient.stream", "LeasedCalls._next")
SEND = ("stream_response", "send_with_request_id", "send_user_message",
        "RequestResponseCycle.send", "_send (")  # fmt: skip
KINDS: list[tuple[str, Test]] = [
    ("socket write of a chunk (uvicorn's transport.write)",
     lambda leaf, stack: "httptools_impl.py:542" in leaf),
    ("event loop's own C code (epoll, recv, callbacks)",
     lambda leaf, stack: leaf.startswith("Thread.run (threading.py")),
    ("Ray's core worker thread", lambda leaf, stack: "Worker.main_loop" in leaf),
    ("Ray metric calls", lambda leaf, stack: "metrics.py" in leaf),
    ("making the OpenAI event (parse, normalise, encode, splice)",
     lambda leaf, stack: _any(*EVENT)(leaf, stack) and not _any(*READ)(leaf, stack)),
    ("reading the engine's stream (aiohttp, SSE split, lease wrapper)", _any(*READ)),
    ("ASGI send path (Starlette, Serve's wrappers, uvicorn's send)", _any(*SEND)),
    ("per request (routing, parsing, leases, Serve's bookkeeping)", lambda leaf, stack: True),
]  # fmt: skip


def shares(path: Path) -> tuple[int, Counter[str]]:
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        total += int(n)
        leaf = stack.split(";")[-1]
        kind = next(name for name, test in KINDS if test(leaf, stack))
        counts[kind] += int(n)
    return total, counts


def main() -> None:
    for arg in sys.argv[1:]:
        total, counts = shares(Path(arg))
        print(f"\n{arg}: {total} samples\n")
        for name, _ in KINDS:
            print(f"| {name} | {counts[name] / max(total, 1) * 100:.0f} % |")


if __name__ == "__main__":
    main()
