"""What every proposer of speculative tokens offers the engine, and what it gets back.

A proposer sees the running sequences whose next token is due and guesses
up to k tokens for each; the target model then checks all guesses of the
whole batch in one forward pass (engine/spec/verify.py). Proposers: a draft
model on the same device (draft.py), n-gram prompt lookup (ngram.py), and a
draft running as its own Serve deployment (deployments/draft_server.py,
injected into the engine as an object: engine/ never imports Ray).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.sequence import Sequence


@dataclass
class SpecRequest:
    """One sequence to propose for. `seq` is read-only to proposers."""

    seq: Sequence
    num_tokens: int  # proposals wanted (>= 1); fewer are fine

    @property
    def temperature(self) -> float:
        return self.seq.params.temperature


@dataclass
class Proposals:
    """The proposals of one batch, row i for request i, padded to the engine's k.

    token_ids lives on the engine's device so a draft model's tokens go
    straight into the target's verify pass without a trip through the host.
    probs is the distribution each proposed token was drawn from (needed by
    rejection sampling at temperature > 0); None means deterministic
    proposals (a one-hot distribution at each token).
    """

    token_ids: torch.Tensor  # [B, k] int64; entries past num_tokens[i] are padding
    num_tokens: list[int]  # valid proposals per row
    probs: torch.Tensor | None = None  # [B, k, vocab] fp32, or None
    # The valid proposals on the host, once someone copied them: the engine sets it from the verdict
    # it reads back anyway, so a proposer that needs them next step makes no copy of its own.
    host_ids: list[list[int]] | None = None

    @classmethod
    def from_lists(
        cls, token_lists: list[list[int]], k: int, device: torch.device, probs: torch.Tensor | None = None
    ) -> Proposals:
        rows = [t[:k] + [0] * (k - len(t[:k])) for t in token_lists]
        ids = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), k).to(device, non_blocking=True)
        return cls(ids, [min(len(t), k) for t in token_lists], probs)

    @classmethod
    def empty(cls, batch: int, k: int, device: torch.device) -> Proposals:
        return cls(torch.zeros(batch, k, dtype=torch.int64, device=device), [0] * batch, None)

    def select(self, rows: list[int]) -> Proposals:
        """The given rows only (e.g. without the rows that got no proposal)."""
        idx = torch.tensor(rows, dtype=torch.int64).to(self.token_ids.device, non_blocking=True)
        probs = self.probs.index_select(0, idx) if self.probs is not None else None
        return Proposals(self.token_ids.index_select(0, idx), [self.num_tokens[r] for r in rows], probs)

    def host_token_ids(self) -> list[list[int]]:
        """The valid proposals of each row as lists (one device-to-host copy, the first time only)."""
        if self.host_ids is None:
            self.host_ids = [row[:n] for row, n in zip(self.token_ids.tolist(), self.num_tokens)]
        return self.host_ids


class Proposer(Protocol):
    """Guesses the next tokens of a batch of sequences.

    propose is called once per engine step with every sequence that
    speculates this step, from the engine's own thread (never an event
    loop). release tells the proposer that sequences are finished, aborted
    or preempted, so it can drop whatever state it keeps for them.
    """

    name: str

    def propose(self, batch: list[SpecRequest]) -> Proposals: ...

    def release(self, seq_ids: list[int]) -> None: ...
