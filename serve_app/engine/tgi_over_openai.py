"""TGI's generate API over an engine that speaks only OpenAI's completions API (vLLM).

    completion(route, body, model, max_tokens)   a TGI body as the engine's `/v1/completions`
                        payload, with the `TgiAnswer` that turns the engine's answer back; a
                        parameter with no faithful equivalent is refused by name (`InvalidRequest`,
                        TGI's 422 on TGI's routes), never dropped
    TgiAnswer.reply     a whole completion as TGI's `/generate` answer (a list of one for `/`),
                        with the `x-prompt-tokens` and `x-generated-tokens` headers
    TgiAnswer.events    a stream's translator: completion chunks in, TGI's token events out
    TgiAnswer.error     an engine's refusal in TGI's words (422 `validation`, ...)
    tokenize(body, model) TGI's `/tokenize` as a completion that echoes the prompt and generates
                        nothing; its answer (`TgiAnswer.reply`) is TGI's list of `SimpleToken`s
    tgi_info(tier)      TGI's `/info` for such a tier, from its configuration

Values in, values out: `serve_app.router.requests` makes the call for a tier whose engine speaks
OpenAI only, `serve_app.router.dispatch` applies the call's `TgiAnswer` to what comes back.

What the engine is asked for, beyond the translated sampling: each token's id and log-probability
(`return_token_ids`, `logprobs: 0`), which TGI's events and `details` carry; the prompt's tokens
and log-probabilities for `decoder_input_details` (`echo`); stop sequences kept in the text
(`include_stop_str_in_output`), as TGI keeps them; and explicit neutral sampling values, so that
the model's own generation defaults (which vLLM applies) do not change what TGI's parameters mean.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import EngineReplyError, InvalidRequest
from .client import EngineReply, reply_error
from .sse import Batch

if TYPE_CHECKING:
    from ..config import TierConfig

TGI_API_VERSION = "3.3.7"  # the TGI release whose API this translation follows
MAX_STOP_SEQUENCES = 4  # TGI's default `--max-stop-sequences`
Shape = Literal["object", "list", "stream", "tokens"]
# TGI's finish reasons by vLLM's: a `stop` is TGI's `stop_sequence` when vLLM names the string
# that stopped it (`stop_reason`), else the end-of-sequence token (or a stop token id).
LENGTH, EOS, STOP_SEQUENCE = "length", "eos_token", "stop_sequence"
# Parameters TGI's clients send with a null (or default) value whatever the call: these values
# mean "not asked for" and need no equivalent.
UNSET: Mapping[str, tuple[Any, ...]] = {
    "adapter_id": (None, ""),
    "best_of": (None, 1),
    "top_n_tokens": (None, 0),
    "typical_p": (None,),
    "watermark": (None, False),
}
# Why each TGI parameter that has no equivalent is refused when set.
REFUSED: Mapping[str, str] = {
    "adapter_id": "this tier's engine (vLLM) serves no LoRA adapters",
    "best_of": "vLLM's completions API has no `best_of`",
    "top_n_tokens": "vLLM names the most likely tokens by their text alone, and TGI's "
    "`top_tokens` need each token's id",
    "typical_p": "vLLM has no typical sampling",
    "watermark": "vLLM has no equivalent of TGI's watermark",
}
TRANSLATED = frozenset(
    {
        "decoder_input_details", "details", "do_sample", "frequency_penalty", "grammar",
        "max_new_tokens", "repetition_penalty", "return_full_text", "seed", "stop",
        "temperature", "top_k", "top_p", "truncate",
    }
)  # fmt: skip
BODY_FIELDS = frozenset({"inputs", "parameters", "stream"})


# -- the call: what goes to the engine, and how its answer comes back ----------------------------


@dataclass(frozen=True)
class TgiAnswer:
    """How the engine's completion becomes TGI's answer: its shape (`/generate`'s object, `/`'s
    list of one, a stream, or `/tokenize`'s tokens), the prompt to prepend (`return_full_text`;
    for `/tokenize`, the text the tokens are placed in), and which details."""

    shape: Shape
    prefix: str = ""
    details: bool = False
    prefill: bool = False  # decoder_input_details
    seed: int | None = None

    def reply(self, reply: EngineReply) -> EngineReply:
        """A whole completion as TGI's answer; an error in TGI's body and status."""
        if reply.status != 200:
            error = self.error(reply_error(reply.status, reply.body))
            body = {"error": error.message, "error_type": error.error_type}
            return EngineReply(error.status, _dumps(body).encode(), reply.headers)
        data = _object(reply.body)
        choice = _choice(data)
        if self.shape == "tokens":
            return EngineReply(200, _dumps(simple_tokens(self.prefix, choice)).encode())
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt_tokens, generated = usage.get("prompt_tokens"), usage.get("completion_tokens")
        reason = finish_reason(choice)  # an aborted generation is an error, details or not
        answer: dict[str, Any] = {"generated_text": self.prefix + _text(choice)}
        if self.details:
            prefill, tokens = _tokens(choice, self.prefill)
            _mark_eos(tokens, reason)
            answer["details"] = {
                "finish_reason": reason,
                "generated_tokens": generated if isinstance(generated, int) else len(tokens),
                "seed": self.seed,
                "prefill": prefill,
                "tokens": tokens,
            }
        headers = dict(reply.headers)
        if isinstance(prompt_tokens, int) and isinstance(generated, int):
            headers["x-prompt-tokens"] = str(prompt_tokens)
            headers["x-generated-tokens"] = str(generated)
        body = [answer] if self.shape == "list" else answer
        return EngineReply(200, _dumps(body).encode(), tuple(headers.items()))

    def events(self) -> TgiEvents:
        return TgiEvents(self)

    @staticmethod
    def error(error: EngineReplyError) -> EngineReplyError:
        """An engine's refusal with TGI's status and `error_type`: a request it found invalid is
        TGI's 422 `validation`, one it had no room for TGI's 429 `overloaded`."""
        if error.status in (400, 422):
            return EngineReplyError(422, error.message, "validation")
        if error.status == 413:
            return EngineReplyError(413, error.message, "validation")
        if error.status == 429:
            return EngineReplyError(429, error.message, "overloaded")
        return EngineReplyError(error.status, error.message, "generation")


@dataclass(frozen=True)
class Completion:
    """A TGI request as the engine's completions payload, and how its answer comes back."""

    payload: dict[str, Any]
    answer: TgiAnswer


def completion(route: str, body: Mapping[str, Any], model: str, max_tokens: int) -> Completion:
    """`body` (TGI's `{"inputs", "parameters"}`, and `stream` on `/`) for the engine's
    `/v1/completions`, with `max_tokens` (the tier's default applied) and `model` (the engine's
    served name). Raises `InvalidRequest` naming the parameter that is wrong or has no
    equivalent."""
    for name in body:
        if name not in BODY_FIELDS and body[name] is not None:
            raise InvalidRequest(f"unknown field `{name}`", param=name)
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise InvalidRequest("`inputs` must be a non-empty string", param="inputs")
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise InvalidRequest("`parameters` must be an object", param="parameters")
    stream = route == "/generate_stream" or (route == "/" and body.get("stream") is True)
    _refuse_untranslatable(params)
    details = _flag(params, "details")
    prefill = _flag(params, "decoder_input_details")
    if prefill and stream:
        raise _invalid("decoder_input_details", "`decoder_input_details` is not available "
                       "when streaming tokens")  # fmt: skip
    seed = _int(params, "seed", low=0, high=2**63 - 1)
    payload: dict[str, Any] = {
        "model": model,
        "prompt": inputs,
        "max_tokens": max_tokens,
        **_sampling(params),
        "include_stop_str_in_output": True,
        "return_token_ids": True,
        "logprobs": 0,
        "stream": stream,
    }
    if seed is not None:
        payload["seed"] = seed
    stop = _stop(params)
    if stop:
        payload["stop"] = stop
    truncate = _int(params, "truncate", low=1)
    if truncate is not None:  # TGI keeps the prompt's last tokens
        payload["truncate_prompt_tokens"] = truncate
        payload["truncation_side"] = "left"
    grammar = _grammar(params.get("grammar"))
    if grammar is not None:
        payload["structured_outputs"] = grammar
    if prefill:  # the prompt's tokens and log-probabilities, ahead of the generated ones
        payload["echo"] = True
    if stream:
        payload["stream_options"] = {"include_usage": True}
    shape: Shape = "stream" if stream else "list" if route == "/" else "object"
    prefix = inputs if _flag(params, "return_full_text") else ""
    return Completion(payload, TgiAnswer(shape, prefix, details or prefill, prefill, seed))


def tokenize(body: Mapping[str, Any], model: str) -> Completion:
    """TGI's `/tokenize` body (`{"inputs", "parameters"}`, the parameters unused as TGI leaves
    them) for the engine: the prompt echoed without generating (`echo`, `max_tokens: 0`), whose
    log-probabilities carry each of its tokens' text beside the ids. vLLM's own `/tokenize`
    gives the tokenizer's raw pieces, which only the tokenizer could turn back into text."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise InvalidRequest("`inputs` must be a non-empty string", param="inputs")
    payload = {"model": model, "prompt": inputs, "echo": True, "max_tokens": 0, "logprobs": 0,
               "return_token_ids": True, "temperature": 0.0}  # fmt: skip
    return Completion(payload, TgiAnswer("tokens", prefix=inputs))


def _refuse_untranslatable(params: Mapping[str, Any]) -> None:
    for name, value in params.items():
        if name in REFUSED:
            if value not in UNSET[name]:
                raise _invalid(name, f"`{name}` is not available on this tier: {REFUSED[name]}")
        elif name not in TRANSLATED and value is not None:
            raise _invalid(name, f"unknown parameter `{name}`")


def _sampling(params: Mapping[str, Any]) -> dict[str, Any]:
    """TGI's sampling in vLLM's fields, every one explicit. TGI samples when `do_sample` is set
    or any of temperature, top_p, top_k is given, and decodes greedily otherwise."""
    temperature = _number(params, "temperature", low=0, low_open=True)
    top_p = _number(params, "top_p", low=0, high=1, low_open=True, high_open=True)
    top_k = _int(params, "top_k", low=1)
    repetition = _number(params, "repetition_penalty", low=0, low_open=True)
    frequency = _number(params, "frequency_penalty", low=-2, high=2)
    sample = _flag(params, "do_sample") or any(v is not None for v in (temperature, top_p, top_k))
    return {
        "temperature": (1.0 if temperature is None else temperature) if sample else 0.0,
        "top_p": 1.0 if top_p is None else top_p,
        "top_k": 0 if top_k is None else top_k,  # 0: no top-k cut
        "min_p": 0.0,
        "repetition_penalty": 1.0 if repetition is None else repetition,
        "frequency_penalty": 0.0 if frequency is None else frequency,
        "presence_penalty": 0.0,
    }


def _stop(params: Mapping[str, Any]) -> list[str]:
    stop = params.get("stop")
    if stop is None:
        return []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _invalid("stop", "`stop` must be an array of non-empty strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise _invalid("stop", f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. "
                       f"Given: {len(stop)}")  # fmt: skip
    return stop


def _grammar(grammar: Any) -> dict[str, Any] | None:
    """TGI's `grammar` as vLLM's `structured_outputs`: a JSON schema (`json`, or `json_schema`
    with its `schema`) or a regular expression (`regex`)."""
    if grammar is None:
        return None
    kind = grammar.get("type") if isinstance(grammar, dict) else None
    value = grammar.get("value") if isinstance(grammar, dict) else None
    if kind == "json" and isinstance(value, (dict, str)):
        return {"json": value}
    if kind == "json_schema" and isinstance(value, dict) and isinstance(value.get("schema"), dict):
        return {"json": value["schema"]}
    if kind == "regex" and isinstance(value, str):
        return {"regex": value}
    raise _invalid("grammar", '`grammar` must be {"type": "json" or "regex" or "json_schema", '
                   '"value": ...} with a schema (or a schema\'s text) or a pattern')  # fmt: skip


def _invalid(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=f"parameters.{name}")


def _flag(params: Mapping[str, Any], name: str) -> bool:
    value = params.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, f"`{name}` must be a boolean")
    return value


def _number(
    params: Mapping[str, Any],
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float | None:
    """A number within TGI's bounds (an open end is itself refused), or None when unset."""
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _invalid(name, f"`{name}` must be a number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise _invalid(name, f"`{name}` must be {bounds}. Given: {value}")
    return float(value)


def _int(params: Mapping[str, Any], name: str, *, low: int, high: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(name, f"`{name}` must be an integer")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise _invalid(name, f"`{name}` must be {bounds}. Given: {value}")
    return value


# -- the answer ----------------------------------------------------------------------------------


def finish_reason(choice: Mapping[str, Any]) -> str | None:
    """TGI's finish reason for a completion choice; None while it goes on. A completion the
    engine aborted or failed has no TGI reason: it is an engine error."""
    reason = choice.get("finish_reason")
    if reason is None:
        return None
    if reason == "length":
        return LENGTH
    if reason == "stop":
        return STOP_SEQUENCE if isinstance(choice.get("stop_reason"), str) else EOS
    raise EngineReplyError(502, f"the engine ended the generation: {reason}", "generation")


def _tokens(
    choice: Mapping[str, Any], prefill: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prompt's tokens (when echoed: `decoder_input_details`) and the generated ones, as
    TGI's `PrefillToken`s and `Token`s, from the choice's ids and log-probabilities."""
    ids = _ints(choice.get("token_ids"))
    logprobs = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else {}
    texts = [t if isinstance(t, str) else "" for t in logprobs.get("tokens") or []]
    values = list(logprobs.get("token_logprobs") or [])
    values += [None] * (len(texts) - len(values))
    prompt_ids = _ints(choice.get("prompt_token_ids")) if prefill else []
    skip = len(prompt_ids)
    prefill_tokens = [
        {"id": i, "text": t, "logprob": _logprob(v)}
        for i, t, v in zip(prompt_ids, texts[:skip], values[:skip], strict=False)
    ]
    generated = [token(i, t, v) for i, t, v in zip(ids, texts[skip:], values[skip:], strict=False)]
    return prefill_tokens, generated


def simple_tokens(inputs: str, choice: Mapping[str, Any]) -> list[dict[str, Any]]:
    """TGI's `SimpleToken`s of the echoed prompt: id, text and character offsets in `inputs`.
    Tokens that each hold part of a character (decoded alone as U+FFFD) all span that
    character, as a tokenizer's own offsets do."""
    ids = _ints(choice.get("prompt_token_ids"))
    logprobs = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else {}
    texts = [t if isinstance(t, str) else "" for t in logprobs.get("tokens") or []]
    out: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # parts of a character, spanned once it is passed
    cursor = 0
    for token_id, piece in zip(ids, texts, strict=False):
        item = {"id": token_id, "text": piece, "start": cursor, "stop": cursor}
        out.append(item)
        start = -1 if not piece or "\ufffd" in piece else inputs.find(piece, cursor)
        if start < 0:
            pending.append(item)
            continue
        for part in pending:
            part["stop"] = start
        pending = []
        item["start"], item["stop"] = start, start + len(piece)
        cursor = start + len(piece)
    for part in pending:
        part["stop"] = len(inputs)
    return out


def token(token_id: int, text: str, logprob: Any, special: bool = False) -> dict[str, Any]:
    """TGI's `Token`."""
    return {"id": token_id, "text": text, "logprob": _logprob(logprob), "special": special}


def _mark_eos(tokens: list[dict[str, Any]], reason: str | None) -> None:
    """The end-of-sequence token that ended a generation is TGI's one special token in it."""
    if reason == EOS and tokens:
        tokens[-1]["special"] = True


def _logprob(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ints(value: Any) -> list[int]:
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _text(choice: Mapping[str, Any]) -> str:
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise EngineReplyError(502, "the engine's completion is not a JSON object", "generation")
    return data


def _choice(data: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EngineReplyError(502, "the engine's completion has no choice", "generation")
    choice: Mapping[str, Any] = choices[0]
    return choice


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class TgiEvents:
    """One stream's translation: each completion chunk's tokens become TGI's token events, the
    last carrying `generated_text` and `details`; an engine error becomes TGI's error event, and
    a stream that ends before its last token an `incomplete_generation` error."""

    answer: TgiAnswer
    index: int = 0  # TGI's events count their tokens from 1
    input_length: int = 0
    text: list[str] = field(default_factory=list)
    last: dict[str, Any] | None = None  # the last token sent
    done: bool = False

    def batch(self, batch: Batch) -> Batch:
        out: Batch = []
        for data in batch:
            if self.done or data == "[DONE]":
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = {"error": {"message": "the engine sent an event that is not JSON"}}
            if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
                out.append(self._error(chunk))
                continue
            choices = chunk.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                try:
                    out += self._choice(choices[0])
                except EngineReplyError as exc:
                    out.append(_dumps({"error": exc.message, "error_type": exc.error_type}))
                    self.done = True
        return out

    def end(self) -> Batch:
        """The engine's stream closed: an error event unless its last token came."""
        if self.done:
            return []
        self.done = True
        message = "the engine's stream ended before its last token"
        return [_dumps({"error": message, "error_type": "incomplete_generation"})]

    def _choice(self, choice: Mapping[str, Any]) -> Batch:
        prompt_ids = choice.get("prompt_token_ids")
        if isinstance(prompt_ids, list):
            self.input_length = len(prompt_ids)
        self.text.append(_text(choice))
        _, tokens = _tokens(choice, prefill=False)
        reason = finish_reason(choice)
        _mark_eos(tokens, reason)
        events: list[dict[str, Any]] = []
        for item in tokens:
            self.index += 1
            events.append({"index": self.index, "token": item, "generated_text": None,
                           "details": None})  # fmt: skip
        if reason is not None:
            if not events and self.last is None:
                raise EngineReplyError(502, "the engine ended without a token", "generation")
            if not events:  # the finish came alone: TGI's last event needs a token; an empty one
                events.append({"index": self.index,
                               "token": {**self.last, "text": "", "special": True},
                               "generated_text": None, "details": None})  # fmt: skip
            events[-1]["generated_text"] = self.answer.prefix + "".join(self.text)
            events[-1]["details"] = {
                "finish_reason": reason,
                "generated_tokens": self.index,
                "input_length": self.input_length,
                "seed": self.answer.seed,
            }
            self.done = True
        if events:
            self.last = events[-1]["token"]
        return [_dumps(e) for e in events]

    def _error(self, chunk: Any) -> str:
        self.done = True
        error = chunk.get("error") if isinstance(chunk, dict) else None
        info = error if isinstance(error, dict) else chunk if isinstance(chunk, dict) else {}
        message = info.get("message") if isinstance(info.get("message"), str) else str(error)
        code = info.get("code")
        error_type = "validation" if code in (400, 422) else "generation"
        return _dumps({"error": message, "error_type": error_type})


# -- /info ---------------------------------------------------------------------------------------


def tgi_info(tier: TierConfig) -> dict[str, Any]:
    """TGI's `/info` for a tier whose engine has none, from the tier's configuration."""
    engine = tier.engine
    return {
        "model_id": engine.model_id,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": engine.tuning.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": engine.max_input_tokens,
        "max_total_tokens": engine.max_total_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "serve-app (TGI's API over vLLM)",
        "version": TGI_API_VERSION,
        "sha": None,
        "docker_label": None,
    }


class TgiStream:
    """A tier's stream of completion chunks (`serve_app.router.dispatch.Calls`) as TGI's events:
    batches that hold no token are passed over, and the end of the stream is told to the
    translator (`TgiEvents.end`)."""

    __slots__ = ("_calls", "_ended", "_events")

    def __init__(self, events: TgiEvents, calls: Any) -> None:
        self._events = events
        self._calls = calls
        self._ended = False

    async def __anext__(self) -> Batch:
        while not self._ended:
            batch = await anext(self._calls, None)
            if batch is None:
                self._ended = True
                last = self._events.end()
                if last:
                    return last
                break
            out = self._events.batch(batch)
            if out:
                return out
        raise StopAsyncIteration

    def cancel(self) -> None:
        self._calls.cancel()

    async def first(self, batch: Batch | None) -> Batch | None:
        """The stream's first batch of events, from the tier's first batch of chunks (None:
        the tier's stream ended at once)."""
        if batch is None:
            return await anext(self, None)
        out = self._events.batch(batch)
        return out if out else await anext(self, None)
