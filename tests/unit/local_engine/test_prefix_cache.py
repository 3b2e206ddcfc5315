"""The simulated engine's prefix cache: hits on shared leading blocks, LRU eviction."""

from __future__ import annotations

import pytest

from serve_app.local_engine.prefix_cache import Prefill, PrefixCache


def test_a_repeated_prompt_hits_its_whole_blocks() -> None:
    cache = PrefixCache(capacity_tokens=1000, block_tokens=4)
    prompt = list(range(10))  # two whole blocks and a partial one
    assert cache.admit(prompt) == 0
    assert cache.admit(prompt) == 8


def test_only_the_shared_leading_blocks_hit() -> None:
    cache = PrefixCache(capacity_tokens=1000, block_tokens=4)
    cache.admit([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert cache.admit([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]) == 8
    # the same block after a different first block is another block (chained hash)
    assert cache.admit([0, 0, 0, 0, 5, 6, 7, 8]) == 0


def test_least_recently_used_blocks_are_forgotten_first() -> None:
    cache = PrefixCache(capacity_tokens=8, block_tokens=4)  # two blocks
    a, b, c = [1] * 4, [2] * 4, [3] * 4
    cache.admit(a)
    cache.admit(b)
    assert cache.admit(a) == 4  # a is now the most recent
    cache.admit(c)  # evicts b
    assert cache.admit(b) == 0
    assert cache.admit(c) == 4


def test_prefill_time_counts_uncached_tokens_only() -> None:
    prefill = Prefill(0.001, PrefixCache(1000, block_tokens=4))
    prompt = list(range(100))
    assert prefill.seconds(prompt) == pytest.approx(0.1)
    assert prefill.seconds(prompt) == pytest.approx(0.0)
    assert Prefill(0.001, None).seconds(prompt) == pytest.approx(0.1)
