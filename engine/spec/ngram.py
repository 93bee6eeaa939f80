"""N-gram prompt lookup: propose what followed the last occurrence of the sequence's own tail.

No model: if the last n tokens (n from ngram_max down to ngram_min) occurred
earlier in the prompt or output, the tokens that followed that occurrence
are the guess. It pays on text that repeats itself (code edits, quoting,
extraction). Each sequence keeps an index from n-gram to where it last
ended, extended with the new tokens only, so a lookup is O(1) per n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.config import SpeculativeConfig
from engine.spec.proposer import Proposals, SpecRequest


@dataclass
class _Index:
    num_indexed: int = 0  # n-grams ending before this position are indexed
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> its latest end position


class NgramProposer:
    name = "ngram"

    def __init__(self, config: SpeculativeConfig, device: torch.device) -> None:
        self.k = config.num_speculative_tokens
        self.n_min, self.n_max = config.ngram_min, config.ngram_max
        self.device = device
        self._index: dict[int, _Index] = {}

    def propose(self, batch: list[SpecRequest]) -> Proposals:
        return Proposals.from_lists([self.lookup(r.seq.seq_id, r.seq.token_ids, r.num_tokens) for r in batch], self.k, self.device)

    def lookup(self, key: int, tokens: list[int], k: int) -> list[int]:
        index = self._index.setdefault(key, _Index())
        # Index every n-gram that ends before the last token (the tail itself must not match itself).
        last = len(tokens) - 1
        for end in range(index.num_indexed, last):
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                index.last_end[tuple(tokens[end - n + 1 : end + 1])] = end
        index.num_indexed = max(index.num_indexed, last)
        for n in range(min(self.n_max, len(tokens)), self.n_min - 1, -1):
            end = index.last_end.get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                return tokens[end + 1 : end + 1 + k]
        return []

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._index.pop(seq_id, None)
