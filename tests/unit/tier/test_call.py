"""What the router hands a tier: a call's token bound for its quota reservation."""

from __future__ import annotations

import pickle

import pytest

from serve_app.engine.tgi_over_openai import completion
from serve_app.tier.call import TierCall


@pytest.mark.parametrize(("prompt_chars", "max_tokens", "bound"), [(120, 64, 184), (0, 1, 1)])
def test_a_calls_token_estimate_bounds_what_it_may_use(
    prompt_chars: int, max_tokens: int, bound: int
) -> None:
    call = TierCall("/generate", {"inputs": "x"}, stream=False, max_tokens=max_tokens,
                    prompt_chars=prompt_chars)  # fmt: skip
    # every prompt token is at least one character: the characters bound the prompt's tokens
    assert call.token_estimate == bound
    assert call.trace == {}


def test_a_translated_call_crosses_to_a_replica_with_its_answer_shape() -> None:
    # the relay data path pickles the call to the tier replica (Ray), its TgiAnswer with it
    sent = completion("/generate", {"inputs": "x", "parameters": {"details": True}}, "m", 8)
    call = TierCall("/v1/completions", sent.payload, False, 8, 1, answer=sent.answer)
    assert pickle.loads(pickle.dumps(call)) == call
