"""What the engine hands back for each request after a step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """One of the n completions of a request, cumulative so far.

    `new_token_ids` / `new_text` hold only what this step added (for streaming).
    """

    index: int
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    new_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None


# What a step added to one request, as the engine core sends it (LLMEngine.step_deltas):
# per choice (index, new_token_ids, new_text, finish_reason, stop_reason, new_logprobs),
ChoiceDelta = tuple[int, list[int], str, str | None, str | int | None, list[TokenLogprob] | None]
# per request (request_id, finished, num_cached_tokens, metrics when finished, choices).
RequestDelta = tuple[str, bool, int, RequestMetrics | None, list[ChoiceDelta]]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    prefix_cache_hit_rate: float
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    # Speculative decoding, counted over (sequence, step) pairs that had proposals.
    spec_proposer: str | None = None
    spec_steps: int = 0
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_acceptance_rate: float = 0.0  # accepted / proposed
    spec_mean_accepted_tokens_per_step: float = 0.0  # accepted proposals per step
    spec_mean_tokens_per_step: float = 0.0  # tokens emitted per step: the accepted ones + the target's own
    spec_chained_steps: int = 0  # steps launched from the device's verdict, before the host read the one before
    # Scheduled batches (chained speculative steps apart): all, those with prompt tokens, and their
    # sequences summed. Per request they tell a batch that stays full from one that keeps taking
    # arrivals one at a time (each such step runs prompt rows beside the decodes).
    steps_total: int = 0
    prompt_steps_total: int = 0
    step_seqs_total: int = 0
