"""`python -m serve_app.local_engine`: a drop-in for `text-generation-launcher` on CPU."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn

from .backend import Backend, LlamaBackend
from .cli import EngineArgs, parse_args
from .model import ModelNotFoundError, resolve_gguf
from .prefix_cache import Prefill, PrefixCache
from .scheduler import Scheduler
from .server import Engine, create_app
from .simulated import SIMULATED_MODEL, SimulatedBackend, Timetable

log = logging.getLogger("local_engine")


class JsonLines(logging.Formatter):
    """TGI's `--json-output` shape: one object per line with timestamp, level and fields."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "level": record.levelname,
                "fields": {"message": record.getMessage()},
                "target": record.name,
            }
        )


def configure_logging(json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonLines() if json_output else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the private llama.cpp socket


class DrainingServer(uvicorn.Server):
    """Stops on SIGTERM or SIGINT after draining in-flight requests, then exits 0, as TGI does.

    uvicorn itself re-raises the signal once drained, so the process would die by it.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(sig: int, frame: FrameType | None) -> None:
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def load_backend(args: EngineArgs) -> Backend:
    if args.model_id == SIMULATED_MODEL:
        table = Timetable(args.sim_ttft_ms / 1000, args.sim_itl_ms / 1000, args.sim_output_tokens)
        log.info("simulating a model: %s, %d slots", table, args.max_batch_size)
        cache = PrefixCache(args.sim_prefix_cache_tokens) if args.sim_prefix_cache_tokens else None
        per_token = args.sim_prefill_us_per_token / 1e6
        prefill = Prefill(per_token, cache) if per_token else None
        return SimulatedBackend(
            table, slots=args.max_batch_size, prefill=prefill, failure_rate=args.sim_failure_rate
        )
    gguf = resolve_gguf(args.model_id)
    log.info("loading %s with %d slots", gguf.name, args.max_batch_size)
    return LlamaBackend(
        gguf,
        slots=args.max_batch_size,
        max_total_tokens=args.max_total_tokens,
        workers=args.max_batch_size,
        threads=args.threads,
    )


async def serve(args: EngineArgs) -> None:
    backend = load_backend(args)
    if args.model_id == SIMULATED_MODEL and args.sim_load_s > 0:
        log.info("loading the simulated model: %.1f s", args.sim_load_s)
        await asyncio.sleep(args.sim_load_s)  # a cold start, as a large model's weights take
    try:
        scheduler = Scheduler(
            backend,
            max_concurrent_requests=args.max_concurrent_requests,
            eos=await backend.eos_token(),
            max_batch_total_tokens=args.max_batch_size * args.max_total_tokens,
        )
        app = create_app(Engine(args=args, scheduler=scheduler, backend=backend))
        config = uvicorn.Config(
            app,
            host=args.hostname,
            port=args.port,
            log_config=None,
            access_log=False,
            # Idle connections stay open longer than a router's pool keeps them (60 s, see
            # `serve_app.engine.client`), so the router is the side that closes them.
            timeout_keep_alive=90,
            timeout_graceful_shutdown=args.graceful_termination_timeout,
        )
        # The port is bound only now, with the model loaded: an open port means ready, as in TGI.
        log.info("Connected: serving on %s:%d", args.hostname, args.port)
        await DrainingServer(config).serve()
    finally:
        await backend.aclose()


def main(argv: list[str] | None = None) -> int:
    args, ignored = parse_args(argv)
    configure_logging(args.json_output)
    for flag in ignored:
        log.info("%s does not apply to the CPU engine; ignored", flag)
    try:
        asyncio.run(serve(args))
    except ModelNotFoundError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
