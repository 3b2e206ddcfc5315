"""TGI's generate API over OpenAI's completions: the request each TGI body becomes, what is
refused by name, and vLLM's answers (recorded from vLLM 0.32 serving SmolLM2-135M on CPU) as TGI's
answers, events and errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve_app.config import TierConfig
from serve_app.engine.client import EngineReply, reply_error
from serve_app.engine.tgi_over_openai import (
    TgiAnswer,
    TgiStream,
    completion,
    simple_tokens,
    tgi_info,
    tokenize,
)
from serve_app.errors import EngineReplyError, InvalidRequest

MODEL = "smollm2"
PROMPT = "What is the capital of France? The capital of France is"
PROMPT_IDS = [1780, 314, 260, 3575, 282, 4649, 47, 378, 3575, 282, 4649, 314]


def payload(parameters: dict[str, Any] | None = None, route: str = "/generate") -> dict[str, Any]:
    body = {"inputs": PROMPT, "parameters": parameters or {}}
    return completion(route, body, MODEL, 20).payload


def refusal(parameters: dict[str, Any], route: str = "/generate", **body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        completion(route, {"inputs": PROMPT, "parameters": parameters, **body}, MODEL, 20)
    return caught.value


# -- requests ------------------------------------------------------------------------------------


def test_a_bare_request_is_greedy_with_every_sampling_value_explicit() -> None:
    assert payload() == {
        "model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0.0, "top_p": 1.0,
        "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
        "presence_penalty": 0.0, "include_stop_str_in_output": True, "return_token_ids": True,
        "logprobs": 0, "stream": False,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("parameters", "temperature"),
    [
        ({"do_sample": True}, 1.0),  # TGI samples at temperature 1 unless told
        ({"do_sample": False, "temperature": 0.5}, 0.5),  # a warper set means sampling
        ({"top_k": 5}, 1.0),
        ({"top_p": 0.9}, 1.0),
        ({"do_sample": False}, 0.0),
    ],
)
def test_tgi_samples_when_asked_or_when_a_warper_is_set(
    parameters: dict[str, Any], temperature: float
) -> None:
    assert payload(parameters)["temperature"] == temperature


def test_sampling_and_stops_are_translated() -> None:
    asked = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.2,
             "frequency_penalty": 0.5, "seed": 42, "stop": ["\n", "."], "truncate": 8,
             "max_new_tokens": 20}  # fmt: skip
    sent = payload(asked)
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.7, 0.9, 40)
    assert (sent["repetition_penalty"], sent["frequency_penalty"], sent["seed"]) == (1.2, 0.5, 42)
    assert sent["stop"] == ["\n", "."]
    # TGI's truncate keeps the prompt's last tokens
    assert (sent["truncate_prompt_tokens"], sent["truncation_side"]) == (8, "left")


@pytest.mark.parametrize(
    ("grammar", "structured"),
    [
        ({"type": "json", "value": {"type": "object"}}, {"json": {"type": "object"}}),
        ({"type": "json", "value": '{"type": "object"}'}, {"json": '{"type": "object"}'}),
        ({"type": "json_schema", "value": {"name": "x", "schema": {"type": "integer"}}},
         {"json": {"type": "integer"}}),
        ({"type": "regex", "value": "[0-9]{3}"}, {"regex": "[0-9]{3}"}),
    ],
)  # fmt: skip
def test_grammars_become_vllms_structured_outputs(
    grammar: dict[str, Any], structured: dict[str, Any]
) -> None:
    assert payload({"grammar": grammar})["structured_outputs"] == structured


def test_a_stream_asks_for_usage_and_post_slash_streams_when_its_body_says_so() -> None:
    assert payload(route="/generate_stream")["stream_options"] == {"include_usage": True}
    body = {"inputs": PROMPT, "stream": True}
    sent = completion("/", body, MODEL, 20)
    assert sent.payload["stream"] is True and sent.answer.shape == "stream"
    assert completion("/", {"inputs": PROMPT}, MODEL, 20).answer.shape == "list"


def test_decoder_input_details_echo_the_prompt_with_its_log_probabilities() -> None:
    sent = completion("/generate", {"inputs": PROMPT,
                      "parameters": {"decoder_input_details": True}}, MODEL, 20)  # fmt: skip
    assert sent.payload["echo"] is True
    assert sent.answer.details and sent.answer.prefill


def test_the_null_and_default_values_tgis_clients_always_send_are_accepted() -> None:
    # text-generation's `Client.generate` and huggingface_hub's `text_generation` send every
    # parameter, unset ones as null (or their default)
    sent = {"adapter_id": None, "best_of": None, "decoder_input_details": False, "details": True,
            "do_sample": False, "frequency_penalty": None, "grammar": None, "max_new_tokens": 20,
            "repetition_penalty": None, "return_full_text": False, "seed": None, "stop": [],
            "temperature": None, "top_k": None, "top_n_tokens": None, "top_p": None,
            "truncate": None, "typical_p": None, "watermark": False}  # fmt: skip
    assert payload(sent)["temperature"] == 0.0


@pytest.mark.parametrize(
    ("parameters", "param", "words"),
    [
        ({"typical_p": 0.5}, "parameters.typical_p", "typical sampling"),
        ({"watermark": True}, "parameters.watermark", "watermark"),
        ({"best_of": 2, "do_sample": True}, "parameters.best_of", "best_of"),
        ({"top_n_tokens": 3}, "parameters.top_n_tokens", "id"),
        ({"adapter_id": "my-lora"}, "parameters.adapter_id", "LoRA"),
        ({"no_such": 1}, "parameters.no_such", "unknown parameter"),
        ({"temperature": 0}, "parameters.temperature", "> 0"),
        ({"top_p": 1.0}, "parameters.top_p", "< 1"),
        ({"top_k": 0}, "parameters.top_k", ">= 1"),
        ({"repetition_penalty": 0}, "parameters.repetition_penalty", "> 0"),
        ({"frequency_penalty": 3}, "parameters.frequency_penalty", "<= 2"),
        ({"seed": -1}, "parameters.seed", ">= 0"),
        ({"seed": "42"}, "parameters.seed", "integer"),
        ({"truncate": 0}, "parameters.truncate", ">= 1"),
        ({"details": "yes"}, "parameters.details", "boolean"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop", "up to 4"),
        ({"stop": "x"}, "parameters.stop", "array"),
        ({"grammar": {"type": "lark", "value": "start: x"}}, "parameters.grammar", "regex"),
    ],
)
def test_what_has_no_equivalent_or_is_out_of_bounds_is_refused_by_name(
    parameters: dict[str, Any], param: str, words: str
) -> None:
    error = refusal(parameters)
    assert error.param == param
    assert words in error.message


def test_decoder_input_details_are_refused_when_streaming_as_tgi_does() -> None:
    error = refusal({"decoder_input_details": True}, route="/generate_stream")
    assert error.param == "parameters.decoder_input_details"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"inputs": ""}, "inputs"),
        ({"inputs": 3}, "inputs"),
        ({"inputs": PROMPT, "parameters": []}, "parameters"),
        ({"inputs": PROMPT, "extra": True}, "extra"),
    ],
)
def test_a_malformed_body_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        completion("/generate", body, MODEL, 20)
    assert caught.value.param == param


# -- whole answers (vLLM's, as recorded) ---------------------------------------------------------


def choice(text: str, tokens: list[str], logprobs: list[float | None], ids: list[int],
           reason: str | None, stop_reason: str | None = None,
           prompt_ids: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"index": 0, "text": text, "finish_reason": reason, "stop_reason": stop_reason,
            "logprobs": {"text_offset": [], "token_logprobs": logprobs, "tokens": tokens,
                         "top_logprobs": []},
            "token_ids": ids, "prompt_token_ids": prompt_ids, "prompt_logprobs": None}  # fmt: skip


PARIS = choice(" Paris.", [" Paris", ".", "<|im_end|>"], [-0.046, -0.16, -0.47], [7042, 30, 2],
               "stop", prompt_ids=PROMPT_IDS)  # fmt: skip
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def whole(*choices: dict[str, Any], status: int = 200, usage: Any = USAGE) -> EngineReply:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
            "choices": list(choices), "usage": usage}  # fmt: skip
    return EngineReply(status, json.dumps(body).encode(), (("x-request-id", "r"),))


def test_a_whole_answer_with_details_in_tgis_shape_and_its_token_counts() -> None:
    reply = TgiAnswer("object", details=True, seed=None).reply(whole(PARIS))
    assert reply.status == 200
    assert json.loads(reply.body) == {
        "generated_text": " Paris.",
        "details": {
            "finish_reason": "eos_token", "generated_tokens": 3, "seed": None, "prefill": [],
            "tokens": [
                {"id": 7042, "text": " Paris", "logprob": -0.046, "special": False},
                {"id": 30, "text": ".", "logprob": -0.16, "special": False},
                {"id": 2, "text": "<|im_end|>", "logprob": -0.47, "special": True},
            ],
        },
    }  # fmt: skip
    assert reply.header("x-prompt-tokens") == "12" and reply.header("x-generated-tokens") == "3"


def test_without_details_only_the_text_and_with_return_full_text_the_prompt_first() -> None:
    reply = TgiAnswer("object", prefix=PROMPT).reply(whole(PARIS))
    assert json.loads(reply.body) == {"generated_text": PROMPT + " Paris."}


def test_post_slash_answers_a_list_of_one() -> None:
    reply = TgiAnswer("list").reply(whole(PARIS))
    assert json.loads(reply.body) == [{"generated_text": " Paris."}]


@pytest.mark.parametrize(
    ("reason", "stop_reason", "tgi"),
    [("length", None, "length"), ("stop", None, "eos_token"), ("stop", " Paris", "stop_sequence")],
)
def test_finish_reasons_in_tgis_words(reason: str, stop_reason: str | None, tgi: str) -> None:
    answer = choice(" Paris", [" Paris"], [-0.05], [7042], reason, stop_reason)
    body = json.loads(TgiAnswer("object", details=True).reply(whole(answer)).body)
    assert body["details"]["finish_reason"] == tgi
    # only an end-of-sequence token is special
    assert body["details"]["tokens"][-1]["special"] is (tgi == "eos_token")


def test_decoder_input_details_split_the_echoed_prompt_from_the_generated_tokens() -> None:
    texts = ["What", " is", " Paris"]
    echoed = choice(" Paris", texts, [None, -3.87, -0.05], [7042], "length",
                    prompt_ids=[1780, 314])  # fmt: skip
    body = json.loads(TgiAnswer("object", details=True, prefill=True).reply(whole(echoed)).body)
    assert body["details"]["prefill"] == [
        {"id": 1780, "text": "What", "logprob": None},
        {"id": 314, "text": " is", "logprob": -3.87},
    ]
    assert body["details"]["tokens"] == [
        {"id": 7042, "text": " Paris", "logprob": -0.05, "special": False}
    ]


def test_the_clients_seed_is_reported_in_the_details() -> None:
    body = json.loads(TgiAnswer("object", details=True, seed=42).reply(whole(PARIS)).body)
    assert body["details"]["seed"] == 42


VLLM_400 = {"error": {"message": "max_tokens=5000 cannot be greater than max_model_len=2048.",
                      "type": "BadRequestError", "param": "max_tokens", "code": 400}}  # fmt: skip


def test_an_engine_refusal_is_tgis_422_validation_error() -> None:
    refused = EngineReply(400, json.dumps(VLLM_400).encode())
    reply = TgiAnswer("object").reply(refused)
    assert reply.status == 422
    assert json.loads(reply.body) == {
        "error": "max_tokens=5000 cannot be greater than max_model_len=2048.",
        "error_type": "validation",
    }


@pytest.mark.parametrize(
    ("status", "tgi_status", "error_type"),
    [(400, 422, "validation"), (422, 422, "validation"), (429, 429, "overloaded"),
     (500, 500, "generation")],
)  # fmt: skip
def test_engine_errors_take_tgis_status_and_type(
    status: int, tgi_status: int, error_type: str
) -> None:
    error = TgiAnswer.error(reply_error(status, json.dumps(VLLM_400).encode()))
    assert (error.status, error.error_type) == (tgi_status, error_type)
    assert error.message.startswith("max_tokens=5000")


@pytest.mark.parametrize("body", [b"not json", b"[]", json.dumps({"choices": []}).encode()])
def test_a_completion_that_is_not_one_is_an_engine_error(body: bytes) -> None:
    with pytest.raises(EngineReplyError) as caught:
        TgiAnswer("object").reply(EngineReply(200, body))
    assert caught.value.status == 502


@pytest.mark.parametrize("details", [True, False])
def test_an_aborted_generation_is_an_engine_error(details: bool) -> None:
    aborted = choice("", [], [], [], "abort")
    with pytest.raises(EngineReplyError):
        TgiAnswer("object", details=details).reply(whole(aborted))


# -- streams (vLLM's chunks, as recorded) --------------------------------------------------------


def chunk(text: str, token: str, logprob: float, token_id: int, reason: str | None = None,
          stop_reason: str | None = None, prompt_ids: list[int] | None = None) -> str:  # fmt: skip
    data = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "text": text,
                         "logprobs": {"text_offset": [0], "token_logprobs": [logprob],
                                      "tokens": [token], "top_logprobs": [{token: logprob}]},
                         "finish_reason": reason, "stop_reason": stop_reason,
                         "prompt_token_ids": prompt_ids, "token_ids": [token_id]}]}  # fmt: skip
    return json.dumps(data)


USAGE_CHUNK = json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1,
                          "model": MODEL, "choices": [], "usage": USAGE})  # fmt: skip
STREAM = [
    chunk(" Paris", " Paris", -0.046, 7042, prompt_ids=PROMPT_IDS),
    chunk(".", ".", -0.16, 30),
    chunk("", "<|im_end|>", -0.47, 2, "stop"),
    USAGE_CHUNK,
    "[DONE]",
]


def test_each_token_is_one_event_and_the_last_carries_the_text_and_details() -> None:
    events = TgiAnswer("stream", prefix="Q: ", seed=7).events()
    out = [json.loads(e) for e in events.batch(STREAM[:2]) + events.batch(STREAM[2:])]
    assert [e["token"] for e in out] == [
        {"id": 7042, "text": " Paris", "logprob": -0.046, "special": False},
        {"id": 30, "text": ".", "logprob": -0.16, "special": False},
        {"id": 2, "text": "<|im_end|>", "logprob": -0.47, "special": True},
    ]
    assert [e["index"] for e in out] == [1, 2, 3]
    assert [e["generated_text"] for e in out] == [None, None, "Q:  Paris."]
    assert out[-1]["details"] == {
        "finish_reason": "eos_token", "generated_tokens": 3, "input_length": 12, "seed": 7,
    }  # fmt: skip
    assert out[0]["details"] is None
    assert events.end() == []  # the last token came: nothing more


def test_a_stop_sequence_ends_the_stream_in_tgis_words() -> None:
    events = TgiAnswer("stream").events()
    stopped = chunk(" Paris", " Paris", -0.05, 7042, "stop", " Paris", PROMPT_IDS)
    (last,) = [json.loads(e) for e in events.batch([stopped, USAGE_CHUNK, "[DONE]"])]
    assert last["details"]["finish_reason"] == "stop_sequence"
    assert last["generated_text"] == " Paris"


def test_an_error_inside_the_stream_is_tgis_error_event_and_ends_it() -> None:
    events = TgiAnswer("stream").events()
    failed = json.dumps({"error": {"message": "engine died", "type": "InternalServerError",
                                   "code": 500}})  # fmt: skip
    out = events.batch([STREAM[0], failed, STREAM[1]])
    assert json.loads(out[-1]) == {"error": "engine died", "error_type": "generation"}
    assert len(out) == 2 and events.end() == []


def test_a_stream_cut_before_its_last_token_ends_with_an_incomplete_generation_error() -> None:
    events = TgiAnswer("stream").events()
    events.batch(STREAM[:1])
    (error,) = events.end()
    assert json.loads(error)["error_type"] == "incomplete_generation"


def test_a_finish_without_a_token_still_ends_with_a_token_event() -> None:
    events = TgiAnswer("stream").events()
    events.batch(STREAM[:1])
    bare = json.loads(chunk("", "x", 0.0, 1, "length"))
    bare["choices"][0].update(token_ids=[], logprobs=None)
    (last,) = [json.loads(e) for e in events.batch([json.dumps(bare)])]
    assert last["token"]["special"] is True and last["token"]["text"] == ""
    assert last["details"]["generated_tokens"] == 1
    assert last["generated_text"] == " Paris"


def test_a_finish_before_any_token_is_a_generation_error() -> None:
    bare = json.loads(chunk("", "x", 0.0, 1, "length"))
    bare["choices"][0].update(token_ids=[], logprobs=None)
    (error,) = TgiAnswer("stream").events().batch([json.dumps(bare)])
    assert json.loads(error)["error_type"] == "generation"


class Chunks:
    """A tier's stream as `Dispatcher` gets it: batches, then the end; `cancel` recorded."""

    def __init__(self, batches: list[list[str]]) -> None:
        self._batches = iter(batches)
        self.cancelled = False

    async def __anext__(self) -> list[str] | None:
        try:
            return next(self._batches)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


def test_the_tiers_stream_as_tgis_events_skips_batches_with_no_token() -> None:
    async def run() -> tuple[list[list[str]], bool]:
        chunks = Chunks([[USAGE_CHUNK], STREAM[1:3], ["[DONE]"]])
        stream = TgiStream(TgiAnswer("stream").events(), chunks)
        first = await stream.first([STREAM[0]])
        rest = [batch async for batch in _iterate(stream)]
        stream.cancel()
        assert first is not None
        return [first, *rest], chunks.cancelled

    batches, cancelled = asyncio.run(run())
    assert [len(b) for b in batches] == [1, 2]
    assert json.loads(batches[-1][-1])["details"]["finish_reason"] == "eos_token"
    assert cancelled


def test_a_tier_stream_that_ends_early_ends_with_an_error_event() -> None:
    async def run() -> list[list[str]]:
        stream = TgiStream(TgiAnswer("stream").events(), Chunks([]))
        first = await stream.first([STREAM[0]])
        assert first is not None
        return [first] + [batch async for batch in _iterate(stream)]

    batches = asyncio.run(run())
    assert json.loads(batches[-1][0])["error_type"] == "incomplete_generation"


async def _iterate(stream: TgiStream) -> Any:
    while (batch := await anext(stream, None)) is not None:
        yield batch


# -- /info ---------------------------------------------------------------------------------------


def test_info_is_made_of_the_tiers_settings() -> None:
    settings = {"name": "v", "engine": {"launcher": "vllm", "model_id": "m",
                "max_input_tokens": 100, "max_total_tokens": 200},
                "default_max_tokens": 16, "max_tokens_limit": 64}  # fmt: skip
    tier = TierConfig.model_validate(settings)
    info = tgi_info(tier)
    assert (info["model_id"], info["max_input_tokens"], info["max_total_tokens"]) == ("m", 100, 200)
    assert info["max_best_of"] == 1 and info["max_stop_sequences"] == 4


# -- /tokenize -----------------------------------------------------------------------------------

# vLLM's answer to the echoed prompt (`echo`, `max_tokens: 0`), as recorded
ECHOED = choice(PROMPT, ["What", " is", " the", " capital", " of", " France", "?", " The",
                         " capital", " of", " France", " is"],
                [None, -3.87, -0.78, -4.68, -0.24, -1.93, -0.18, -3.07, -4.36, -0.08, -0.24,
                 -0.08], [], "length", prompt_ids=PROMPT_IDS)  # fmt: skip


def test_tokenize_echoes_the_prompt_without_generating() -> None:
    sent = tokenize({"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}, MODEL)
    expected = {"model": MODEL, "prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 0,
                "return_token_ids": True, "temperature": 0.0}  # fmt: skip
    assert sent.payload == expected
    with pytest.raises(InvalidRequest):
        tokenize({"inputs": ""}, MODEL)


def test_tokenize_answers_tgis_simple_tokens_with_their_offsets() -> None:
    reply = tokenize({"inputs": PROMPT}, MODEL).answer.reply(whole(ECHOED))
    tokens = json.loads(reply.body)
    assert [t["id"] for t in tokens] == PROMPT_IDS
    assert tokens[:2] == [
        {"id": 1780, "text": "What", "start": 0, "stop": 4},
        {"id": 314, "text": " is", "start": 4, "stop": 7},
    ]
    assert all(PROMPT[t["start"] : t["stop"]] == t["text"] for t in tokens)
    assert tokens[-1]["stop"] == len(PROMPT)


def test_tokens_holding_parts_of_a_character_all_span_it() -> None:
    inputs = "Hi 🙂!"
    split = choice(inputs, ["Hi", " \ufffd", "\ufffd", "!"], [None, -1.0, -1.0, -1.0], [],
                   "length", prompt_ids=[1, 2, 3, 4])  # fmt: skip
    assert simple_tokens(inputs, split) == [
        {"id": 1, "text": "Hi", "start": 0, "stop": 2},
        {"id": 2, "text": " \ufffd", "start": 2, "stop": 4},
        {"id": 3, "text": "\ufffd", "start": 2, "stop": 4},
        {"id": 4, "text": "!", "start": 4, "stop": 5},
    ]
