"""A sequence owns its tokens, its progress counters and its block table."""

from __future__ import annotations

import enum
import itertools
import sys
from dataclasses import dataclass, field

import torch

from engine.kv_cache.block_pool import KVBlock
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion of a request (a request with n > 1 has n of them).

    num_computed_tokens counts tokens whose K/V are in the cache; the tokens
    past it are what the next step must feed the model. With async scheduling
    the last num_pending_tokens of them are sampled but still on the device:
    counted in num_tokens, not yet in token_ids.
    """

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    generator: torch.Generator | None = None
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # sampled by a step still in flight (async scheduling only)
    max_num_tokens: int = sys.maxsize  # prompt + max_tokens, capped at the context (set by the engine)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    blocks: list[KVBlock] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    table_row: int | None = None  # this sequence's row of the allocator's BlockTable while it holds blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)


class SequenceIds:
    """Hands out sequence ids; one per engine, so no module-level counter."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def new(self) -> int:
        return next(self._next)
