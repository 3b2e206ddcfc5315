"""llama.cpp through `xllamacpp`: continuous batching over a fixed number of slots.

`xllamacpp.Server` always starts llama.cpp's own HTTP server. It is bound to a Unix socket in a
private directory, so the engine opens no TCP listener beyond the one TGI's protocol asks for; the
socket serves only tokenisation and chat templating. Generation runs through the library's
blocking call on a worker thread (the call releases the GIL) and streams back through its
callback, which is also how a cancelled request frees its slot: the callback answers "stop".
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from .validation import EngineError, Sampling

CONTROL_TIMEOUT_S = 60.0  # tokenising, chat templates: see LlamaBackend.__init__

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass(frozen=True)
class GeneratedToken:
    token: Token
    top_tokens: tuple[Token, ...]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    generated_tokens: int
    input_length: int


class Backend(Protocol):
    """What the scheduler and the routes need of a model: `LlamaBackend`, or the simulation."""

    slots: int

    async def tokenize(self, text: str) -> list[tuple[int, str]]: ...
    async def eos_token(self) -> Token: ...
    async def apply_chat_template(self, messages: list[dict[str, Any]]) -> str: ...
    def generate(
        self, prompt: str, sampling: Sampling
    ) -> AsyncIterator[GeneratedToken | Finished]: ...
    async def aclose(self) -> None: ...


class LlamaBackend:
    def __init__(
        self, gguf: Path, *, slots: int, max_total_tokens: int, workers: int, threads: int | None
    ) -> None:
        import xllamacpp  # heavy native module: imported only when an engine really starts

        self._dir = tempfile.mkdtemp(prefix="local-engine-")
        os.chmod(self._dir, 0o700)
        socket_path = os.path.join(self._dir, "llama.sock")
        params = xllamacpp.CommonParams()
        params.model.path = str(gguf)
        params.n_parallel = slots
        params.n_ctx = slots * max_total_tokens  # llama.cpp splits the context over the slots
        for cpu in (params.cpuparams, params.cpuparams_batch):
            # Engines that share a host's cores must split them (`--threads`): llama.cpp's
            # threads synchronise on every step, and one that loses its core stalls the rest.
            cpu.n_threads = threads or os.cpu_count() or 1
        params.hostnames = [socket_path]
        params.warmup = True
        self._server = xllamacpp.Server(params)
        # Tokenising and chat templates are quick, but llama.cpp answers them on the threads
        # that also decode: a busy engine on few cores can take seconds.
        self._control = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://llama",
            timeout=CONTROL_TIMEOUT_S,
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llama")
        self.slots = slots

    async def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """One control call to llama.cpp; one that does not answer is the engine's 503."""
        try:
            return await self._control.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(
                503, "unhealthy", f"the model server did not answer {path}: {exc!r}"
            ) from exc

    async def tokenize(self, text: str) -> list[tuple[int, str]]:
        """Token ids and pieces, with the model's special prefix tokens as generation sees them."""
        reply = await self._call(
            "POST", "/tokenize", {"content": text, "add_special": True, "with_pieces": True}
        )
        reply.raise_for_status()
        return decoded_pieces(reply.json()["tokens"])

    async def eos_token(self) -> Token:
        """The end-of-sequence token, which TGI streams last (`special: true`)."""
        props = await self._call("GET", "/props")
        props.raise_for_status()
        text = str(props.json().get("eos_token") or "")
        reply = await self._call("POST", "/tokenize", {"content": text, "add_special": False})
        reply.raise_for_status()
        ids = reply.json()["tokens"]
        return Token(id=int(ids[0]) if len(ids) == 1 else 0, text=text, logprob=None, special=True)

    async def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        reply = await self._call("POST", "/apply-template", {"messages": messages})
        if reply.status_code != 200:
            raise EngineError(422, "template_error", _llama_error_message(reply))
        return str(reply.json()["prompt"])

    async def generate(
        self, prompt: str, sampling: Sampling
    ) -> AsyncIterator[GeneratedToken | Finished]:
        """Stream tokens, then one `Finished`. Closing the iterator early frees the slot."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def on_chunk(chunk: dict[str, Any]) -> bool:
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            return cancelled.is_set()

        def run() -> None:
            payload = {"prompt": prompt, "stream": True, **sampling.llama_params()}
            try:
                self._server.handle_completions(payload, on_chunk)
            except BaseException as exc:  # handed over to the event loop, never swallowed
                loop.call_soon_threadsafe(chunks.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(chunks.put_nowait, None)

        self._executor.submit(run)
        try:
            while (chunk := await chunks.get()) is not None:
                if isinstance(chunk, BaseException):
                    raise EngineError(424, "generation", str(chunk)) from chunk
                if "error" in chunk:
                    raise EngineError(424, "generation", chunk["error"].get("message", "failed"))
                choice = chunk["choices"][0]
                for entry in (choice.get("logprobs") or {}).get("content") or ():
                    yield GeneratedToken(_token(entry), tuple(map(_token, entry["top_logprobs"])))
                if choice.get("finish_reason"):
                    usage = chunk.get("usage") or {}
                    yield Finished(
                        reason=_finish_reason(choice["finish_reason"]),
                        generated_tokens=int(usage.get("completion_tokens", 0)),
                        input_length=int(usage.get("prompt_tokens", 0)),
                    )
        finally:
            cancelled.set()

    async def aclose(self) -> None:
        await self._control.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._dir, ignore_errors=True)


def _token(entry: dict[str, Any]) -> Token:
    return Token(id=int(entry["id"]), text=entry["token"], logprob=entry.get("logprob"))


def _finish_reason(llama_reason: str) -> FinishReason:
    # llama.cpp is given no stop strings (the scheduler matches them), so its "stop" is always
    # the end-of-sequence token.
    return "length" if llama_reason == "length" else "eos_token"


def _llama_error_message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text or f"llama.cpp answered {reply.status_code}"


def decoded_pieces(tokens: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Token ids and their text. llama.cpp gives a token that holds only part of a character's
    UTF-8 bytes (emoji, CJK) as a list of byte values: the token that completes the character
    gets it, the ones before it an empty text."""
    out: list[tuple[int, str]] = []
    pending = b""
    for token in tokens:
        piece = token["piece"]
        if isinstance(piece, str):
            if pending:  # bytes that never made a character
                out[-1] = (out[-1][0], pending.decode(errors="replace"))
                pending = b""
            out.append((token["id"], piece))
            continue
        pending += bytes(piece)
        try:
            text = pending.decode()
        except UnicodeDecodeError:
            out.append((token["id"], ""))
            continue
        out.append((token["id"], text))
        pending = b""
    if pending and out:
        out[-1] = (out[-1][0], pending.decode(errors="replace"))
    return out
