"""TGI's request validation: wire JSON in, a typed `Sampling` or an `EngineError` out.

Messages, bounds and defaults follow TGI 3.3's router (`validation.rs`), so clients see the same
422s from the local engine as from TGI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cli import EngineArgs


class EngineError(Exception):
    """An error TGI reports as `{"error": message, "error_type": kind}` with `status`.

    `plain` errors are the HTTP framework's own rejections (body not JSON, wrong field types,
    body too large), which TGI answers with a plain-text body instead.
    """

    def __init__(self, status: int, kind: str, message: str, *, plain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.plain = plain

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.kind}


def invalid(message: str) -> EngineError:
    """TGI's `ValidationError`, which its answers prefix with "Input validation error: "."""
    return EngineError(422, "validation", f"Input validation error: {message}")


def rejected(status: int, message: str) -> EngineError:
    """A request the JSON extractor refuses before validation, with its plain-text body."""
    return EngineError(status, "rejected", message, plain=True)


def wrong_shape(problem: str) -> EngineError:
    return rejected(422, f"Failed to deserialize the JSON body into the target type: {problem}")


def overloaded() -> EngineError:
    return EngineError(429, "overloaded", "Model is overloaded")


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters, already checked against the engine's limits."""

    max_new_tokens: int
    temperature: float  # 0 means greedy
    top_p: float
    top_k: int
    typical_p: float
    repetition_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    top_n_tokens: int
    json_schema: dict[str, Any] | None = None
    truncate: int | None = None  # keep only the last `truncate` prompt tokens

    def llama_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "typical_p": self.typical_p,
            "min_p": 0.0,
            "repeat_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            # Stop sequences are matched by the scheduler, as TGI does: on the text generated
            # so far, after each whole token, and kept in the answer. llama.cpp would cut them.
            # One log-probability always: TGI reports each token's.
            "logprobs": max(1, self.top_n_tokens),
        }
        if self.seed is not None:
            params["seed"] = self.seed
        if self.json_schema is not None:
            params["json_schema"] = self.json_schema
        return params


def _number(params: dict[str, Any], name: str, kind: type = float) -> Any:
    value = params.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and (isinstance(value, int) or value.is_integer())
    if not ok:
        raise invalid(f"`{name}` must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def check_sampling(
    params: dict[str, Any], args: EngineArgs, *, stream: bool, chat: bool = False
) -> Sampling:
    """Validate TGI `parameters` (or their chat equivalents) against the engine's limits, in
    the order TGI's `validation.rs` checks them. For chat, TGI turns `temperature: 0` into
    greedy decoding before validation; any other temperature is checked as on `/generate`."""
    if not isinstance(params, dict):
        raise invalid("`parameters` must be an object")
    temperature = _number(params, "temperature")
    if chat and temperature == 0:
        temperature = None
        params = {**params, "do_sample": False}
    elif chat:
        params = {**params, "do_sample": True}
    best_of = _number(params, "best_of", int)
    sampling = bool(params.get("do_sample")) or any(
        params.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p")
    )
    if best_of is not None and best_of > 1 and not sampling:
        raise invalid("you must use sampling when `best_of` is > 1")
    if temperature is not None and temperature <= 0:
        raise invalid("`temperature` must be strictly positive")
    repetition_penalty = _number(params, "repetition_penalty")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise invalid("`repetition_penalty` must be strictly positive")
    frequency_penalty = _number(params, "frequency_penalty")
    if frequency_penalty is not None and not -2.0 <= frequency_penalty <= 2.0:
        raise invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    top_p = _number(params, "top_p")
    if top_p is not None and not 0.0 < top_p < 1.0:
        raise invalid("`top_p` must be > 0.0 and < 1.0")
    typical_p = _number(params, "typical_p")
    if typical_p is not None and not 0.0 < typical_p < 1.0:
        raise invalid("`typical_p` must be > 0.0 and < 1.0")
    top_k = _number(params, "top_k", int)
    if top_k is not None and top_k <= 0:
        raise invalid("`top_k` must be strictly positive")
    max_new_tokens = _number(params, "max_new_tokens", int)
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise invalid("`max_new_tokens` must be strictly positive")
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("`stop` must be a list of strings")
    if len(stop) > args.max_stop_sequences:
        raise invalid(
            f"`stop` supports up to {args.max_stop_sequences} stop sequences. Given: {len(stop)}"
        )
    seed = _number(params, "seed", int)
    if seed is not None and not 0 <= seed < 2**64:
        raise invalid("`seed` must be a non-negative 64-bit integer")
    if seed is not None and best_of is not None and best_of > 1:
        raise invalid("`seed` must not be set when `best_of` > 1")
    if best_of is not None and best_of != 1:
        if stream:
            raise invalid("`best_of` != 1 is not supported when streaming tokens")
        if args.max_best_of == 1:
            raise invalid("`best_of` != 1 is not allowed for this endpoint")
        if not 0 < best_of <= args.max_best_of:
            raise invalid(f"`best_of` must be > 0 and <= {args.max_best_of}. Given: {best_of}")
        raise invalid("`best_of` != 1 is not supported by the local engine")
    if stream and params.get("decoder_input_details"):
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens")
    top_n_tokens = _number(params, "top_n_tokens", int) or 0
    if top_n_tokens < 0 or top_n_tokens > args.max_top_n_tokens:
        raise invalid(
            f"`top_n_tokens` must be >= 0 and <= {args.max_top_n_tokens}. Given: {top_n_tokens}"
        )
    truncate = _number(params, "truncate", int)
    if truncate is not None and not 0 < truncate <= args.max_input_tokens:
        raise invalid(
            f"`truncate` must be strictly positive and less than {args.max_input_tokens}. "
            f"Given: {truncate}"
        )
    do_sample = bool(params.get("do_sample", False))
    warped = any(v is not None for v in (temperature, top_p, top_k, typical_p))
    greedy = not (do_sample or warped)
    return Sampling(
        max_new_tokens=max_new_tokens or 0,  # 0: filled in once the input length is known
        temperature=0.0 if greedy else (temperature if temperature is not None else 1.0),
        top_p=top_p if top_p is not None else 1.0,
        top_k=top_k or 0,
        typical_p=typical_p if typical_p is not None else 1.0,
        repetition_penalty=repetition_penalty if repetition_penalty is not None else 1.0,
        frequency_penalty=frequency_penalty or 0.0,
        seed=seed,
        stop=tuple(stop),
        top_n_tokens=top_n_tokens,
        truncate=truncate,
    )


def check_lengths(sampling: Sampling, input_length: int, args: EngineArgs) -> Sampling:
    """Apply TGI's token budget; an unset max_new_tokens takes whatever room is left."""
    if input_length == 0:
        raise invalid("`inputs` cannot be empty")
    if sampling.truncate is not None:
        input_length = min(input_length, sampling.truncate)
    max_new = sampling.max_new_tokens or max(0, args.max_total_tokens - input_length)
    if input_length + max_new > args.max_total_tokens:
        raise invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {args.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    if input_length > args.max_input_tokens:
        raise invalid(
            f"`inputs` must have less than {args.max_input_tokens} tokens. Given: {input_length}"
        )
    return Sampling(**{**sampling.__dict__, "max_new_tokens": max_new})
