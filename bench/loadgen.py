"""A streaming load generator spread over processes, so that the client is never the ceiling.

Each worker process runs its own event loop and aiohttp session and sends streaming chat
requests round-robin over a list of URLs (one URL: the stack's ingress; N URLs: N engines
reached directly). Workers start together at one wall-clock instant; their samples are merged in
the parent.

- Closed loop (`closed_loop`): a fixed number of streams, all starting at once, sharing a fixed
  number of requests; the run ends with its slowest request. Every stream starts in the same
  millisecond, so this is a burst test: good for warming up and for the per-hop CPU breakdown.
- Steady closed loop (`steady_loop`): stream k of N starts k/N of a ramp after the first (the
  ramp: about one answer's length), so requests arrive evenly rather than in waves; every
  stream then sends its next request when the last one ends, until the window closes. Latencies
  are those of requests started inside the window, tokens/s the tokens that arrived inside it.
- Open loop (`open_loop`): Poisson arrivals at a fixed rate, whatever the answers do.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import aiohttp

MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
CONTENT = b'"content"'


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    itl_s: tuple[float, ...]
    e2e_s: float
    tokens: int
    ok: bool
    status: int = 0  # the HTTP status, 0 when the connection failed
    started_at: float = 0.0  # wall clock (time.time) when the request was sent
    error: str = ""  # a failed request's answer (its start), or the client's exception

    def token_times(self) -> list[float]:
        """Wall-clock arrival time of each streamed token."""
        if not self.tokens:
            return []
        times = [self.started_at + self.ttft_s]
        for gap in self.itl_s:
            times.append(times[-1] + gap)
        return times


@dataclass(frozen=True)
class Load:
    """What one measurement sends: where, as which model, how many tokens per answer."""

    urls: tuple[str, ...]
    model: str
    tokens: int
    keys: tuple[str, ...] = ()  # a bearer key per URL (an engine's own), or none

    def target(self, i: int) -> tuple[str, dict[str, str]]:
        """The `i`-th request's URL (round-robin) and headers."""
        k = i % len(self.urls)
        return self.urls[k], {"authorization": f"Bearer {self.keys[k]}"} if self.keys else {}


@dataclass(frozen=True)
class Result:
    samples: list[Sample]
    elapsed_s: float
    window: tuple[float, float] | None = None  # steady loop: the measured wall-clock window


async def one_request(session: aiohttp.ClientSession, i: int, load: Load) -> Sample:
    body = {"model": load.model, "messages": MESSAGES, "max_tokens": load.tokens, "stream": True}
    url, headers = load.target(i)
    started_at = time.time()
    start = time.perf_counter()
    stamps: list[float] = []
    ok = False
    status = 0
    error = ""
    try:
        async with session.post(url, json=body, headers=headers) as reply:
            status = reply.status
            ok = status == 200
            if not ok:
                error = (await reply.read())[:300].decode(errors="replace")
            buffer = b""
            async for data in reply.content.iter_any():
                now = time.perf_counter()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                stamps.extend(now for event in events if CONTENT in event)
    except (TimeoutError, aiohttp.ClientError) as exc:
        ok = False
        error = repr(exc)[:300]
    end = time.perf_counter()
    ttft = stamps[0] - start if stamps else end - start
    itl = tuple(b - a for a, b in pairwise(stamps))
    return Sample(ttft, itl, end - start, len(stamps), ok, status, started_at, error)


def _session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def _closed(load: Load, streams: int, requests: int, offset: int,
                  start_at: float) -> Result:  # fmt: skip
    samples: list[Sample] = []
    remaining = iter(range(requests))
    async with _session(streams * 2) as session:

        async def worker(k: int) -> None:
            for i in remaining:
                samples.append(await one_request(session, offset + k + i, load))

        await asyncio.sleep(max(0.0, start_at - time.time()))
        began = time.time()
        await asyncio.gather(*(worker(k) for k in range(streams)))
        return Result(samples, time.time() - began)


async def _steady(load: Load, first: int, streams: int, total: int, start_at: float,
                  ramp_s: float, duration_s: float) -> Result:  # fmt: skip
    """Streams `first`..`first + streams - 1` of `total`, each started at its share of the ramp
    and sending back to back until the window (ramp end + `duration_s`) closes."""
    samples: list[Sample] = []
    window = (start_at + ramp_s, start_at + ramp_s + duration_s)
    async with _session(streams * 2) as session:

        async def stream(k: int) -> None:
            await asyncio.sleep(max(0.0, start_at + ramp_s * k / total - time.time()))
            i = k
            while time.time() < window[1]:
                samples.append(await one_request(session, i, load))
                i += total

        await asyncio.gather(*(stream(first + k) for k in range(streams)))
        return Result(samples, duration_s, window)


async def _open(load: Load, rate: float, duration_s: float, seed: int,
                start_at: float) -> Result:  # fmt: skip
    rng = random.Random(seed)
    async with _session(8192) as session:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        began, tasks, i = time.time(), [], seed
        while time.time() - began < duration_s:
            tasks.append(asyncio.create_task(one_request(session, i, load)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        samples = list(await asyncio.gather(*tasks))
        return Result(samples, time.time() - began)


def _closed_worker(args: tuple[Load, int, int, int, float]) -> Result:
    return _run(_closed(*args))


def _steady_worker(args: tuple[Load, int, int, int, float, float, float]) -> Result:
    return _run(_steady(*args))


def _open_worker(args: tuple[Load, float, float, int, float]) -> Result:
    return _run(_open(*args))


def _run(coro) -> Result:  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class LoadGenerator:
    """A pool of worker processes, kept for a whole benchmark run."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = multiprocessing.get_context("spawn").Pool(processes)

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def closed_loop(self, load: Load, streams: int, requests_per_stream: int) -> Result:
        start_at = time.time() + 0.3
        parts = [n for n in _split(streams, self.processes) if n]
        jobs = [(load, n, n * requests_per_stream, i * 7919, start_at) for i, n in enumerate(parts)]
        return _merge(self._pool.map(_closed_worker, jobs))

    def steady_loop(self, load: Load, streams: int, duration_s: float, ramp_s: float) -> Result:
        start_at = time.time() + 0.3
        jobs, first = [], 0
        for n in _split(streams, self.processes):
            if n:
                jobs.append((load, first, n, streams, start_at, ramp_s, duration_s))
                first += n
        return _merge(self._pool.map(_steady_worker, jobs))

    def open_loop(self, load: Load, rate: float, duration_s: float, seed: int) -> Result:
        start_at = time.time() + 0.3
        per = rate / self.processes
        jobs = [(load, per, duration_s, seed * 1000 + i, start_at) for i in range(self.processes)]
        return _merge(self._pool.map(_open_worker, jobs))


def _merge(results: list[Result]) -> Result:
    samples = [s for r in results for s in r.samples]
    return Result(samples, max(r.elapsed_s for r in results), results[0].window)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def error_statuses(result: Result) -> dict[str, int]:
    """Failed requests by HTTP status ("0": the connection failed or broke mid-stream)."""
    return dict(Counter(str(s.status) for s in result.samples if not s.ok))


def error_examples(result: Result) -> dict[str, str]:
    """One failed request's answer (or exception) per HTTP status."""
    return {str(s.status): s.error for s in result.samples if not s.ok}


def summary(result: Result, slo_ttft_s: float) -> dict[str, float]:
    """Latency percentiles and rates of one run. With a window (steady loop): the requests
    started inside it, and the tokens and finished requests that arrived inside it."""
    ok = [s for s in result.samples if s.ok]
    if result.window is None:
        measured, finished = result.samples, ok
        tokens = sum(s.tokens for s in ok)
    else:
        begin, end = result.window
        measured = [s for s in result.samples if begin <= s.started_at < end]
        finished = [s for s in ok if begin <= s.started_at + s.e2e_s < end]
        tokens = sum(1 for s in ok for t in s.token_times() if begin <= t < end)
    good = [s for s in measured if s.ok]
    ttft = [s.ttft_s for s in good]
    itl = [x for s in good for x in s.itl_s]
    elapsed = result.elapsed_s
    return {
        "requests": len(measured),
        "errors": len(measured) - len(good),
        "ttft_p50_ms": pct(ttft, 0.5) * 1000,
        "ttft_p90_ms": pct(ttft, 0.9) * 1000,
        "ttft_p99_ms": pct(ttft, 0.99) * 1000,
        "itl_mean_ms": statistics.fmean(itl) * 1000 if itl else float("nan"),
        "itl_p50_ms": pct(itl, 0.5) * 1000,
        "itl_p99_ms": pct(itl, 0.99) * 1000,
        "e2e_p50_ms": pct([s.e2e_s for s in good], 0.5) * 1000,
        "requests_per_s": len(finished) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "goodput_per_s": sum(1 for s in finished if s.ttft_s <= slo_ttft_s) / elapsed,
    }
