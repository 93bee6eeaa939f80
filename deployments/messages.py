"""What the ingress and the LLM replicas send each other (plain picklable dataclasses).

`GenerateRequest` is the one positional argument of every call to an LLM
replica, so the router finds the prompt's token ids there. A replica answers
with `GenerateOutput`s: one cumulative output for a unary call, or a stream
of deltas that `merge` folds into the same cumulative output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Wall clock when the ingress's request router first took this request up (set there, read by
    # the replica for Server-Timing): splits routing into the wait for the router and what follows.
    router_unix_s: float | None = None
    # Wall clock when the ingress learned that its LLM replica accepted the request (set by the router
    # in the ingress process once Serve's admission answer is back; only the ingress reads it).
    accepted_unix_s: float | None = None
    # False: the replica sends token ids without text and the ingress makes it (TextMaker), off the
    # replica's event loop; requests with stop strings get their text where the stops are checked.
    detokenize: bool = True


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def merge(self, other: ChoiceDelta) -> None:
        self.text += other.text
        self.token_ids.extend(other.token_ids)
        if other.logprobs is not None:
            self.logprobs = (self.logprobs or []) + other.logprobs
        self.finish_reason = other.finish_reason or self.finish_reason


@dataclass
class RequestTiming:
    """Latencies seen by the replica: from the request's arrival there to its tokens.

    Sent with a stream's first output (arrival and first token known) and again,
    complete, with the last.
    """

    time_to_first_token_s: float | None = None
    inter_token_latencies_s: list[float] = field(default_factory=list)
    arrived_unix_s: float | None = None  # wall clock, so the ingress can tell how long routing took
    router_unix_s: float | None = None  # GenerateRequest.router_unix_s, handed back
    # With the last output (wall clock): the engine finished the request; its last output reached the
    # replica's handler. The ingress hands both on to the client (server_timing.format_end_timing).
    engine_finished_unix_s: float | None = None
    replica_finished_unix_s: float | None = None


@dataclass
class GenerateOutput:
    request_id: str
    replica_id: str
    prompt_tokens: int
    cached_tokens: int
    choices: list[ChoiceDelta]
    finished: bool = False
    timing: RequestTiming | None = None  # set on a stream's first and last outputs

    def merge(self, other: GenerateOutput) -> None:
        """Folds a later delta into this one (choices matched by index)."""
        by_index = {c.index: c for c in self.choices}
        for delta in other.choices:
            if delta.index in by_index:
                by_index[delta.index].merge(delta)
            else:
                copy = ChoiceDelta(delta.index)
                copy.merge(delta)
                self.choices.append(copy)
                by_index[delta.index] = copy
        self.choices.sort(key=lambda c: c.index)
        self.cached_tokens = max(self.cached_tokens, other.cached_tokens)
        self.finished = other.finished
        if other.timing is not None:
            self.timing = other.timing

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


@dataclass
class ModelInfo:
    """What the ingress needs to know of the model to validate and shape requests."""

    max_model_len: int
    vocab_size: int
    block_size: int
    prefix_index: tuple[str, str] | None  # (actor name, namespace) of the replicas' prefix index
