"""The typed requests: each protocol's body is parsed here, once, and nowhere else.

`parse_openai` turns an OpenAI chat or completions body into an `OpenAIRequest`, `parse_generate`
a TGI generate body into a `GenerateRequest`; every bound the router is responsible for is
checked on the way (a failure is an `InvalidRequest` naming the field). Past this module nobody
reads the raw body: the tier chosen for a request turns the typed value into the `TierCall`
its engine gets (`call(tier)`), with the tier's token limits applied.

Fields the router does not interpret (`messages`' contents, `tools`, `response_format`, TGI's
`parameters` besides `max_new_tokens`, ...) travel in `passthrough`, untouched, to the engine,
which checks them as TGI does. A TGI request for a tier whose engine speaks OpenAI only (vLLM)
is translated instead, and a parameter with no equivalent refused, here, before admission
(`serve_app.engine.tgi_over_openai`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import RouterTuning, TierConfig
from ..engine.tgi_over_openai import completion, tokenize
from ..errors import InvalidRequest
from ..tier.call import EngineRoute, TierCall
from ..tier.policy import RequestTraits
from .grammar import Grammars, generate_grammars, openai_grammars

Kind = Literal["chat", "completion"]
ENGINE_PATH: dict[Kind, EngineRoute] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
}
MAX_STOP_SEQUENCES = 4  # OpenAI's limit, and TGI's default `--max-stop-sequences`
DEFAULT_LIMITS = RouterTuning()
# `gen_ai.operation.name` of each engine route (the span's request attributes).
OPERATIONS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/generate": "text_completion",
    "/generate_stream": "text_completion",
    "/": "text_completion",
}


@dataclass(frozen=True)
class Bound:
    """An OpenAI sampling field's allowed range, narrowed where TGI's is narrower."""

    name: str
    low: float
    high: float
    low_open: bool = False  # the low end itself is refused
    integer: bool = False
    neutral: float | None = None  # a value meaning "off", left out of the engine's payload

    def check(self, value: Any) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if not number or (self.integer and not whole):
            kind = "an integer" if self.integer else "a number"
            raise InvalidRequest(f"`{self.name}` must be {kind}", param=self.name)
        if not (self.low < value if self.low_open else self.low <= value) or value > self.high:
            low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
            raise InvalidRequest(
                f"`{self.name}` is {value}; it must be {low} and <= {self.high:g}",
                param=self.name,
            )


BOUNDS = (
    Bound("temperature", 0, 2),
    # TGI refuses top_p 1 (and 0); 1 means no nucleus cut, so it is simply not sent.
    Bound("top_p", 0, 1, low_open=True, neutral=1),
    # TGI turns presence_penalty p into repetition_penalty p + 2, which must be > 0; 0 is
    # OpenAI's "off", which TGI would read as a repetition penalty of 2.
    Bound("presence_penalty", -2, 2, low_open=True, neutral=0),
    Bound("frequency_penalty", -2, 2, neutral=0),
    Bound("top_logprobs", 0, 20, integer=True),
    Bound("seed", 0, 2**64 - 1, integer=True),
)
# Fields this module replaces in the engine's payload; everything else in an OpenAI body goes
# on as sent (`stream` and `stream_options` too; a stream's options are the router's: `call`).
_REPLACED = frozenset(
    {"model", "n", "max_tokens", "max_completion_tokens", "stop", "logit_bias"}
    | {b.name for b in BOUNDS}
)


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked OpenAI request: which API, the client's model name, what it asked for, and
    the fields passed to the engine as they came (`passthrough`)."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # asked for; the tier's default applies when None
    max_tokens_param: str  # the field that asked: `max_tokens` or `max_completion_tokens`
    prompt_chars: int  # characters of the prompt or of the messages' contents
    sampling: Mapping[str, Any]  # checked sampling fields in TGI's terms, neutral values dropped
    passthrough: Mapping[str, Any] = field(repr=False)
    grammars: Grammars = field(default_factory=Grammars)  # `serve_app.router.grammar`

    @property
    def engine_path(self) -> EngineRoute:
        return ENGINE_PATH[self.kind]

    def traits(self, headers: Mapping[str, str]) -> RequestTraits:
        """What the `auto` rules look at (`serve_app.tier.policy`)."""
        return RequestTraits(self.prompt_chars, self.max_tokens, headers)

    def attributes(self) -> dict[str, Any]:
        """`gen_ai.request.*` span attributes."""
        return _attributes(
            OPERATIONS[self.engine_path],
            model=self.model,
            max_tokens=self.max_tokens,
            temperature=self.sampling.get("temperature"),
            top_p=self.sampling.get("top_p"),
            seed=self.sampling.get("seed"),
            stream=self.stream,
        )

    def call(self, tier: TierConfig) -> TierCall:
        """The engine's payload for `tier`: its default and limit of tokens, its model id, and
        usage always asked of a stream (the router shows it only when the client asked)."""
        if self.max_tokens is None:
            _require_max_tokens(tier, self.max_tokens_param)
        max_tokens = self.max_tokens or tier.default_max_tokens
        if max_tokens > tier.max_tokens_limit:
            raise InvalidRequest(
                f"`{self.max_tokens_param}` is {max_tokens}, above this model's limit of "
                f"{tier.max_tokens_limit}",
                param=self.max_tokens_param,
            )
        payload = {**self.passthrough, **self.sampling}
        payload["max_tokens"] = max_tokens
        payload["model"] = tier.engine.model_id
        if self.stream:
            payload["stream_options"] = {"include_usage": True}
        return TierCall(self.engine_path, payload, self.stream, max_tokens, self.prompt_chars)


def parse_openai(
    kind: Kind, body: Mapping[str, Any], limits: RouterTuning = DEFAULT_LIMITS
) -> OpenAIRequest:
    """Check what the router is responsible for; sampling details are the engine's to check."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` is required and must be a string", param="model")
    passthrough = {k: v for k, v in body.items() if k not in _REPLACED}
    if kind == "chat":
        prompt_chars = _messages(body.get("messages"), limits.max_messages)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest(
                "`prompt` must be a non-empty string (or an array holding one)", param="prompt"
            )
        passthrough["prompt"] = prompt
        prompt_chars = len(prompt)
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("only `n` = 1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", param="stream_options")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _positive_int(body, name)
    sampling = _sampling(kind, body, limits.max_stop_chars)
    _check_tools(body.get("tools"), limits.max_tools)
    return OpenAIRequest(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=bool(stream and options and options.get("include_usage")),
        max_tokens=max_tokens,
        max_tokens_param=name,
        prompt_chars=prompt_chars,
        sampling=sampling,
        passthrough=passthrough,
        # TGI's completions take no grammar: what they carry is not compiled.
        grammars=openai_grammars(body) if kind == "chat" else Grammars(),
    )


def _messages(messages: Any, limit: int) -> int:
    """Check chat messages; the characters of their contents."""
    if isinstance(messages, list) and len(messages) > limit:
        raise InvalidRequest(
            f"`messages` holds {len(messages)} messages, over the limit of {limit}",
            param="messages",
        )
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty array", param="messages")
    chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"`messages[{i}]` must be an object with a string `role`",
                param=f"messages[{i}]",
            )
        chars += _text_length(message.get("content"))
    return chars


def _text_length(content: Any) -> int:
    """Characters of a message's content: a string, or content parts with `text`."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts
        texts = (p.get("text") if isinstance(p, dict) else p for p in content)
        return sum(len(t) for t in texts if isinstance(t, str))
    return 0


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"`{name}` must be a positive integer", param=name)
    return value


def _sampling(kind: Kind, body: Mapping[str, Any], max_stop_chars: int) -> dict[str, Any]:
    """Check OpenAI's sampling fields; the payload fields TGI should see, in TGI's types
    (a neutral value is left out)."""
    out: dict[str, Any] = {}
    for bound in BOUNDS:
        value = body.get(bound.name)
        if value is None:
            continue
        bound.check(value)
        if value != bound.neutral:
            out[bound.name] = value
    logprobs = body.get("logprobs")
    if kind == "chat" and logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest("`logprobs` must be a boolean", param="logprobs")
    if kind == "chat" and body.get("top_logprobs") is not None and not logprobs:
        raise InvalidRequest("`top_logprobs` needs `logprobs` set to true", param="top_logprobs")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]  # TGI takes only a list
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest(
                "`stop` must be a non-empty string or an array of them", param="stop"
            )
        _check_stops(stop, max_stop_chars, "stop")
        out["stop"] = stop
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequest("`logit_bias` must be an object", param="logit_bias")
        if bias:
            raise InvalidRequest("`logit_bias` is not supported by this model", param="logit_bias")
        # TGI's field is a list; an empty map means nothing, so it is not sent.
    return out


def _check_stops(stop: list[str], max_chars: int, param: str) -> None:
    if len(stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"`{param}` has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
            param=param,
        )
    _check_stop_lengths(stop, max_chars, param)


def _check_stop_lengths(stop: list[str], max_chars: int, param: str) -> None:
    longest = max(len(s) for s in stop) if stop else 0
    if longest > max_chars:
        raise InvalidRequest(
            f"`{param}` holds a sequence of {longest} characters; at most {max_chars} are allowed",
            param=param,
        )


def _check_tools(tools: Any, limit: int) -> None:
    """The shape of `tools`; choosing among them (and TGI's refusals) is the engine's."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest("`tools` must be an array", param="tools")
    if len(tools) > limit:
        raise InvalidRequest(
            f"`tools` holds {len(tools)} tools, over the limit of {limit}", param="tools"
        )
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise InvalidRequest(
                f'`tools[{i}]` must be {{"type": "function", "function": {{"name": ...}}}}',
                param=f"tools[{i}]",
            )


@dataclass(frozen=True)
class GenerateRequest:
    """A checked TGI generate request. The body goes to the engine as it came, but for
    `parameters.max_new_tokens`, which the tier's default and limit govern as `max_tokens`
    does on the OpenAI routes (left to itself TGI generates up to `max_total_tokens` minus
    the input)."""

    route: EngineRoute
    stream: bool
    max_new_tokens: int | None
    prompt_chars: int
    passthrough: Mapping[str, Any] = field(repr=False)
    grammars: Grammars = field(default_factory=Grammars)  # `serve_app.router.grammar`

    def attributes(self) -> dict[str, Any]:
        parameters = self.passthrough.get("parameters") or {}
        return _attributes(
            OPERATIONS[self.route],
            model=None,
            max_tokens=self.max_new_tokens,
            temperature=parameters.get("temperature"),
            top_p=parameters.get("top_p"),
            seed=parameters.get("seed"),
            stream=self.passthrough.get("stream"),
        )

    def call(self, tier: TierConfig) -> TierCall:
        asked = self.max_new_tokens
        if asked is not None and asked > tier.max_tokens_limit:
            raise InvalidRequest(
                f"`max_new_tokens` is {asked}, above this tier's limit of {tier.max_tokens_limit}",
                param="parameters.max_new_tokens",
            )
        if asked is None:
            _require_max_tokens(tier, "parameters.max_new_tokens")
        payload = self.passthrough
        max_tokens = asked if asked is not None else tier.default_max_tokens
        if tier.engine.protocol == "openai":  # TGI's API by translation: refused here, if at all
            sent = completion(self.route, payload, tier.engine.model_id, max_tokens)
            return TierCall("/v1/completions", sent.payload, self.stream, max_tokens,
                            self.prompt_chars, answer=sent.answer)  # fmt: skip
        if asked is None:
            parameters = {**(payload.get("parameters") or {}), "max_new_tokens": max_tokens}
            payload = {**payload, "parameters": parameters}
        return TierCall(self.route, payload, self.stream, max_tokens, self.prompt_chars)


def _require_max_tokens(tier: TierConfig, param: str) -> None:
    if tier.tuning.require_max_tokens:
        raise InvalidRequest(
            f"`{param}` is required on this model (require_max_tokens): set it, at most "
            f"{tier.max_tokens_limit}",
            param=param,
        )


def parse_generate(
    route: EngineRoute, body: Mapping[str, Any], limits: RouterTuning = DEFAULT_LIMITS
) -> GenerateRequest:
    """A TGI body for `route`; `POST /` streams when the body says so."""
    stream = route == "/generate_stream" or (route == "/" and body.get("stream") is True)
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequest("`parameters` must be an object", param="parameters")
    asked = (parameters or {}).get("max_new_tokens")
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
        raise InvalidRequest(
            f"`max_new_tokens` must be a positive integer, not {json.dumps(asked)[:40]}",
            param="parameters.max_new_tokens",
        )
    stop = (parameters or {}).get("stop")
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):  # else TGI's 422
        _check_stop_lengths(stop, limits.max_stop_chars, "parameters.stop")
    inputs = body.get("inputs")
    return GenerateRequest(
        route,
        stream,
        asked,
        len(inputs) if isinstance(inputs, str) else 0,
        dict(body),
        generate_grammars(parameters or {}),
    )


@dataclass(frozen=True)
class TokenizeRequest:
    """TGI's `/tokenize`: the prompt to split, and the body as it came (TGI's engines take
    it as it is)."""

    inputs: str
    passthrough: Mapping[str, Any] = field(repr=False)

    def call(self, tier: TierConfig) -> TierCall:
        """The engine's call: TGI's `/tokenize`, or for an engine that speaks OpenAI only, its
        translation (`serve_app.engine.tgi_over_openai.tokenize`)."""
        if tier.engine.protocol == "openai":
            sent = tokenize(self.passthrough, tier.engine.model_id)
            return TierCall("/v1/completions", sent.payload, False, 0, len(self.inputs),
                            answer=sent.answer)  # fmt: skip
        return TierCall("/tokenize", self.passthrough, False, 0, len(self.inputs))


def parse_tokenize(body: Mapping[str, Any]) -> TokenizeRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise InvalidRequest("`inputs` must be a non-empty string", param="inputs")
    return TokenizeRequest(inputs, dict(body))


def _attributes(operation: str, **asked: Any) -> dict[str, Any]:
    found = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": asked["model"],
        "gen_ai.request.max_tokens": asked["max_tokens"],
        "gen_ai.request.temperature": asked["temperature"],
        "gen_ai.request.top_p": asked["top_p"],
        "gen_ai.request.seed": asked["seed"],
        "serve_app.stream": asked["stream"],
    }
    return {k: v for k, v in found.items() if isinstance(v, (str, int, float))}
