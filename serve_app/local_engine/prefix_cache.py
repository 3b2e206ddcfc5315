"""A model of an engine's prefix cache, for the simulated backend: prefill costs time per prompt
token, except for the leading tokens a recent prompt already shared.

Prompts are cut into blocks of `block_tokens`; a block is identified by its tokens and every
token before it (a chained hash), as TGI's and vLLM's prefix caches do. The cache holds at most
`capacity_tokens` worth of blocks and forgets the least recently used first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class PrefixCache:
    def __init__(self, capacity_tokens: int, block_tokens: int = 16) -> None:
        self._capacity = capacity_tokens // block_tokens
        self._block = block_tokens
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def admit(self, token_ids: Sequence[int]) -> int:
        """Leading tokens of this prompt already cached; the prompt's blocks are then cached."""
        cached, chain, hit = 0, b"", True
        for start in range(0, len(token_ids) - len(token_ids) % self._block, self._block):
            block = token_ids[start : start + self._block]
            chain = hashlib.blake2b(chain + repr(block).encode(), digest_size=12).digest()
            if hit and chain in self._blocks:
                cached += self._block
                self._blocks.move_to_end(chain)
                continue
            hit = False
            self._blocks[chain] = None
            if len(self._blocks) > self._capacity:
                self._blocks.popitem(last=False)
        return cached


@dataclass
class Prefill:
    """Time to prefill a prompt: `seconds_per_token` for each token the cache does not hold."""

    seconds_per_token: float
    cache: PrefixCache | None

    def seconds(self, token_ids: Sequence[int]) -> float:
        cached = self.cache.admit(token_ids) if self.cache is not None else 0
        return (len(token_ids) - cached) * self.seconds_per_token
