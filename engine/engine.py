"""LLMEngine: add_request / step / abort over one model on one device.

    engine = LLMEngine.from_pretrained("models/demo-target")
    out = engine.generate(["def fibonacci(n):"], SamplingParams(max_tokens=32, temperature=0))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import ConfigError, InvalidRequestError
from engine.kv_cache.allocator import PagedKVAllocator
from engine.kv_cache.hash_log import CacheChanges
from engine.model.loader import load_model
from engine.outputs import ChoiceDelta, CompletionOutput, EngineStats, RequestDelta, RequestMetrics, RequestOutput, TokenLogprob
from engine.quant import apply_quantization
from engine.runner import DeviceTokens, ModelRunner
from engine.sampler import PendingSample, Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceIds
from engine.spec.chain import LaunchedVerdict, SpecChain
from engine.spec.draft import DraftModel, DraftProposer
from engine.spec.ngram import NgramProposer
from engine.spec.proposer import Proposals, Proposer, SpecRequest
from engine.spec.target_pass import SPEC_GRAPH_MAX_BATCH, VerifyPassOutput
from engine.spec.verify import verify
from engine.tokenizer import eos_token_ids, load_tokenizer
from engine.validation import validate_request

Prompt = str | list[int]


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    emitted: list[int] = field(default_factory=list)  # tokens already reported, per sequence
    emitted_logprobs: list[int] = field(default_factory=list)
    new_text: list[str] = field(default_factory=list)
    # Fixed when the request is added, so a sampled token is checked with one set lookup and
    # one comparison (with Sequence.max_num_tokens); `_finish_reason` then says which rule ended it.
    stop_ids: frozenset[int] = frozenset()  # stop_token_ids, plus the EOS ids unless ignore_eos

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        return seqs[0].is_finished if len(seqs) == 1 else all(s.is_finished for s in seqs)


@dataclass
class InflightStep:
    """A launched step whose sampled tokens have not been read back yet (async scheduling)."""

    seqs: list[Sequence]  # the sampled sequences, one row each
    sample: PendingSample
    # Tokens each row samples (EngineConfig.num_scheduler_steps); None: one each.
    steps: list[int] | None = None

    def device_tokens(self) -> DeviceTokens:
        """The last pass's tokens: a row with fewer steps is at its length limit and never fed again."""
        return DeviceTokens(self.sample.token_ids, {seq: row for row, seq in enumerate(self.seqs)})


@dataclass
class ChainedStep:
    """A launched chained speculative step (engine/spec/chain.py), its verdict not read back yet."""

    seqs: list[Sequence]  # one row each, in the verify pass's row order
    verdict: LaunchedVerdict


@dataclass
class StepCounters:
    steps: int = 0
    prompt_steps: int = 0  # steps that computed prompt tokens (a new arrival's prefill, or a chunk of it)
    seqs: int = 0

    def count(self, sched: SchedulerOutput) -> None:
        self.steps += 1
        self.seqs += len(sched.scheduled)
        self.prompt_steps += sched.computes_prompt


@dataclass
class SpecCounters:
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    chained_steps: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted


class LLMEngine:
    def __init__(self, config: EngineConfig, proposer: Proposer | None = None) -> None:
        """`proposer`: speculative proposals from outside the engine (speculative.method 'remote')."""
        self.config = config
        spec = config.speculative
        if proposer is not None and not spec.enabled:
            raise ConfigError("a proposer was given but speculative.method is 'none'")
        if spec.method == "remote" and proposer is None:
            raise ConfigError("speculative.method 'remote' needs a proposer object (the draft deployment's)")
        loaded = load_model(config.model, config.dtype, config.device, config.seed)
        self.model, self.arch = loaded.model, loaded.arch
        apply_quantization(
            self.model, config.quantization, checkpoint=loaded.quantization,
            calibration_source=config.tokenizer or loaded.path,
        )
        # "auto": the target's layers fused only while its speculative graphs are captured.
        fuse_speculative = config.fused_norm_linear is not False
        self.model.set_fused_norm_linear(config.fused_norm_linear is True)
        self.model.set_decode_folds(config.decode_folds)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = load_tokenizer(config.tokenizer or loaded.path)
        self.eos_token_ids = eos_token_ids(loaded.path, self.arch.eos_token_ids, self.tokenizer)
        draft = None
        if spec.method == "draft":
            draft = load_model(spec.draft_model, config.dtype, str(self.device), config.seed)
            draft.model.set_fused_norm_linear(fuse_speculative)
            draft.model.set_decode_folds(config.decode_folds)
        block_size = config.cache.block_size
        num_blocks = self._num_kv_blocks(draft.arch if draft else None)
        self.kv_cache = torch.zeros(
            self.arch.num_layers, 2, num_blocks, block_size, self.arch.num_kv_heads, self.arch.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.allocator = PagedKVAllocator(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.max_model_len = min(
            config.max_model_len or self.arch.max_position_embeddings,
            self.arch.max_position_embeddings,
            self.allocator.capacity_tokens,
        )
        if draft is not None:
            self.max_model_len = min(self.max_model_len, draft.arch.max_position_embeddings)
        if not config.scheduler.enable_chunked_prefill:
            # Unchunked, a whole sequence (a prompt, or a preempted one being recomputed) must fit
            # in one step's token budget, or it would wait at the head of the queue forever.
            self.max_model_len = min(self.max_model_len, config.scheduler.max_num_batched_tokens)
        # Speculating sequences get k extra KV slots each step, for the proposals the target checks.
        k = spec.num_speculative_tokens if spec.enabled else 0
        self.runner = ModelRunner(
            self.model, self.kv_cache, self.allocator.block_table, block_size, self.max_model_len,
            config.scheduler.max_num_seqs, use_cuda_graphs=not config.enforce_eager, num_speculative_tokens=k,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens, fuse_speculative=fuse_speculative,
        )
        self.sampler = Sampler(self.device, config.seed, self.arch.vocab_size)
        if draft is not None:
            # The draft's own cache, with the target's block geometry: one block table indexes both.
            draft_kv = torch.zeros(
                draft.arch.num_layers, 2, num_blocks, block_size, draft.arch.num_kv_heads, draft.arch.head_dim,
                dtype=self.dtype, device=self.device,
            )
            graph_batch = 0 if config.enforce_eager else min(config.scheduler.max_num_seqs, SPEC_GRAPH_MAX_BATCH)
            draft_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
            proposer = DraftProposer(
                DraftModel(
                    draft.model, draft_kv, block_size, k, self.arch.vocab_size, self.runner.max_blocks_per_seq,
                    graph_batch, draft_gen,
                )
            )
        elif spec.method == "ngram":
            proposer = NgramProposer(spec, self.device)
        self.proposer: Proposer | None = proposer
        self._spec_counters: dict[str, SpecCounters] = {}
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = SequenceIds()
        wanted = self.device.type == "cuda" if config.async_scheduling == "auto" else config.async_scheduling
        # A proposer reads each step's tokens on the host: speculation steps synchronously, except
        # that the co-located draft's steps chain on the device while the batch stays put.
        self.async_scheduling = wanted and self.proposer is None
        decode_steps = config.num_scheduler_steps if self.async_scheduling else 1
        self.scheduler = Scheduler(config.scheduler, self.allocator, num_lookahead_tokens=k, decode_steps=decode_steps)
        self._inflight: InflightStep | None = None
        self._spec_chain: SpecChain | None = None
        graphs_or_cpu = self.device.type != "cuda" or not config.enforce_eager
        if wanted and graphs_or_cpu and isinstance(self.proposer, DraftProposer) and self.runner.verify_pass is not None:
            with self.model.fused_norm_linear(fuse_speculative):  # the chain's graphs run the target's verify
                self._spec_chain = SpecChain(self.proposer.draft, self.runner.verify_pass, self.sampler.generator)
        self._chained: ChainedStep | None = None
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._steps = StepCounters()

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> "LLMEngine":
        return cls(EngineConfig(model=model, **kwargs))

    # ----- requests -----------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids, not text")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return list(prompt)

    def validate(self, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidRequestError for anything the engine cannot serve; changes nothing."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        validate_request(token_ids, params, self.arch.vocab_size, self.max_model_len)

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        detokenize: bool = True,
    ) -> None:
        """detokenize=False: outputs carry no text unless the request has stop strings (which only
        text can match); the caller turns tokens into text itself (EngineCoreClient does, off the core)."""
        params = params or SamplingParams()
        token_ids = self.tokenize(prompt)
        self.validate(request_id, token_ids, params)
        now = arrival_time or time.monotonic()
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seqs.append(Sequence(self._seq_ids.new(), request_id, i, token_ids, params, now, gen))
        text_here = self.tokenizer is not None and (detokenize or bool(params.stop))
        dets = [IncrementalDetokenizer(self.tokenizer, params.stop) if text_here else None for _ in seqs]
        state = RequestState(request_id, token_ids, params, seqs, dets, RequestMetrics(arrival_time=now))
        state.emitted = [0] * params.n
        state.emitted_logprobs = [0] * params.n
        state.new_text = [""] * params.n
        eos = frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)
        state.stop_ids = frozenset(params.stop_token_ids) | eos
        max_num_tokens = min(len(token_ids) + params.max_tokens, self.max_model_len)
        self.requests[request_id] = state
        self._prompt_tokens_total += len(token_ids) * params.n
        for seq in seqs:
            seq.max_num_tokens = max_num_tokens
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks; its last output, or None if it is unknown."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._finish(seq)
                det = state.detokenizers[seq.index]
                if det is not None:
                    state.new_text[seq.index] += det.flush()
        return self._output(state)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ----- the step loop ------------------------------------------------------------

    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """One scheduled batch through the model; an output for each request that got tokens.

        only_finished: build outputs only for the requests that finished (all `generate`
        reads); the others report everything they added at their next output, so streaming
        deltas stay whole. Building an output per request per step is a large part of a
        decode step's host time at big batches.

        With async scheduling the outputs are those of the step launched by the call before
        (see `_step_async`).
        """
        return self._step(only_finished, self._output)

    def step_deltas(self) -> list[RequestDelta]:
        """`step`, answered as what each request added (the engine core's pipe format): no
        cumulative token lists or output objects are built for requests that only grew."""
        return self._step(False, self._delta)

    def _step(self, only_finished: bool, build: Callable[[RequestState], Any]) -> list:
        if self.async_scheduling:
            return self._step_async(only_finished, build)
        if self._chained is not None:
            return self._chain_step(only_finished, build)
        sched = self.scheduler.schedule()
        if sched.preempted and self.proposer is not None:
            self.proposer.release([seq.seq_id for seq in sched.preempted])
        if sched.is_empty:
            return []
        self._steps.count(sched)
        now = time.monotonic()
        spec = self._propose(sched)
        if spec is None:
            logits, spec_logits, spec_rows = self.runner.execute(sched), None, set()
        else:
            logits, verified = self.runner.execute_spec(sched, spec[0], spec[1])
            spec_rows = set(spec[0])
        for seq in sched.admitted:
            metrics = self.requests[seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        sampled_seqs = self._advance(sched, spec_rows)
        touched: dict[str, RequestState] = {}
        if logits is not None:
            batch = SamplingBatch.from_seqs(sampled_seqs, self.arch.vocab_size, self.device)
            result = self.sampler(logits, batch)
            for seq, token, logprob in zip(sampled_seqs, result.token_ids, result.logprobs):
                state = self.requests[seq.request_id]
                self._append(state, seq, token, logprob)
                touched[state.request_id] = state
        if spec is not None:
            verdict = self._accept(sched, spec[0], spec[1], verified, touched)
            if self._spec_chain is not None:
                self._chained = self._start_chain(sched, spec[0], spec[1], verified, verdict)
        return self._outputs(touched, only_finished, build)

    def _outputs(self, touched: dict[str, RequestState], only_finished: bool, build: Callable[[RequestState], Any]) -> list:
        outputs = []
        for state in touched.values():
            if only_finished and not state.finished:
                continue
            outputs.append(build(state))
            if state.finished:
                del self.requests[state.request_id]
        return outputs

    def _advance(self, sched, spec_rows: set[int]) -> list[Sequence]:
        """Counts this step's tokens as computed and registers the blocks they fill; returns the
        sequences whose next token is sampled now (all their known tokens computed, no proposals)."""
        sampled = []
        cache_full_blocks = self.allocator.cache_full_blocks
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if seq.num_computed_tokens == seq.num_tokens and i not in spec_rows:
                sampled.append(seq)
            cache_full_blocks(seq)
        return sampled

    # ----- async scheduling ------------------------------------------------------------
    #
    # The step is split in two: launch (schedule, prepare, forward, sampling: all queued on the
    # device, nothing waits for it) and complete (read the tokens back, stop checks, text,
    # outputs). Each call launches step N, then completes step N-1, so on a GPU the host's
    # bookkeeping of N-1 and the scheduling of N+1 run while N computes.
    #
    # Step N is scheduled before N-1's tokens are known: every sequence sampled in N-1 counts
    # one pending token (Sequence.num_pending_tokens) and is fed it on the device. A sequence
    # that N-1's token turns out to finish (a stop token, a stop string) has computed one row
    # in N for nothing: the row is dropped when N completes. Its blocks are freed while N may
    # still write that row's K/V; that is safe because whoever gets them next is queued on the
    # device after N. A token that is certainly the last one (the length limit) is not
    # scheduled at all (Scheduler._schedule_running).

    def _step_async(self, only_finished: bool, build: Callable[[RequestState], Any]) -> list:
        sched = self.scheduler.schedule()
        launched = None
        if not sched.is_empty:
            self._steps.count(sched)
            launched = self._launch(sched)
        done, self._inflight = self._inflight, launched
        return [] if done is None else self._complete(done, only_finished, build)

    def _launch(self, sched) -> InflightStep | None:
        """Queues the step on the device; None when it samples no token (only prompt chunks)."""
        now = time.monotonic()
        pending = self._inflight.device_tokens() if self._inflight is not None else None
        logits = self.runner.execute(sched, pending)
        for seq in sched.admitted:
            metrics = self.requests[seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        sampled_seqs = self._advance(sched, set())
        if logits is None:
            return None
        batch = SamplingBatch.from_seqs(sampled_seqs, self.arch.vocab_size, self.device)
        if self.scheduler.decode_steps > 1:
            return self._launch_more(sampled_seqs, logits, batch)
        for seq in sampled_seqs:
            seq.num_pending_tokens += 1
        return InflightStep(sampled_seqs, self.sampler.launch(logits, batch))

    def _launch_more(self, seqs: list[Sequence], logits: torch.Tensor, batch: SamplingBatch) -> InflightStep:
        """The launched step's tokens, then decode passes of the same rows on the device
        (EngineConfig.num_scheduler_steps), all read back together."""
        steps = [self.scheduler.decode_steps_for(seq) for seq in seqs]  # its slots were allocated for these
        draws = [self.sampler.draw(logits, batch)]

        def sample(pass_logits: torch.Tensor) -> torch.Tensor:
            draws.append(self.sampler.draw(pass_logits, batch))
            return draws[-1][0]

        self.runner.decode_more(seqs, draws[0][0], np.array(steps, np.int64), sample)
        for seq, n in zip(seqs, steps):
            seq.num_computed_tokens += n - 1  # every token fed; the last one sampled is pending like the rest
            seq.num_pending_tokens += n
        return InflightStep(seqs, PendingSample(draws, batch.num_logprobs), steps)

    def _complete(self, step: InflightStep, only_finished: bool, build: Callable[[RequestState], Any]) -> list:
        """Reads a launched step's tokens back and appends them; outputs as `step` gives them."""
        results = step.sample.results()
        touched: dict[str, RequestState] = {}
        cache_full_blocks = self.allocator.cache_full_blocks
        for row, seq in enumerate(step.seqs):
            num_tokens = 1 if step.steps is None else step.steps[row]
            seq.num_pending_tokens -= num_tokens
            if seq.is_finished:  # finished by the step before, or aborted: wasted rows
                continue
            state = self.requests[seq.request_id]
            for result in results[:num_tokens]:
                self._append(state, seq, result.token_ids[row], result.logprobs[row])
                if seq.is_finished:  # the rest of its passes computed past its end
                    break
                # The block this token completes (its K/V is queued) could not be hashed before.
                cache_full_blocks(seq)
            touched[state.request_id] = state
        return self._outputs(touched, only_finished, build)

    # ----- speculative decoding ------------------------------------------------------

    def _propose(self, sched) -> tuple[list[int], Proposals] | None:
        """Proposals for the scheduled sequences that speculate this step: (their indices, proposals)."""
        if self.proposer is None:
            return None
        requests: list[SpecRequest] = []
        rows: list[int] = []
        for i, item in enumerate(sched.scheduled):
            if not item.num_lookahead_tokens:  # the scheduler reserves slots only where speculation is on
                continue
            seq = item.seq
            # No proposal past the request's last token or the context: the target adds one of its own.
            k = min(
                item.num_lookahead_tokens,
                seq.params.max_tokens - seq.num_output_tokens - 1,
                self.max_model_len - seq.num_tokens - 1,
            )
            if k >= 1:
                requests.append(SpecRequest(seq, k))
                rows.append(i)
        if not requests:
            return None
        proposals = self.proposer.propose(requests)
        keep = [r for r, n in enumerate(proposals.num_tokens) if n > 0]
        if not keep:
            return None
        if len(keep) < len(rows):
            proposals = proposals.select(keep)
            rows = [rows[r] for r in keep]
        return rows, proposals

    def _accept(
        self, sched, rows: list[int], proposals: Proposals, verified: VerifyPassOutput, touched: dict
    ) -> torch.Tensor:
        """Verify the proposals; append each row's accepted ones and the target's next token.
        Returns the verdict on the device, [rows, 2k + 2]."""
        seqs = [sched.scheduled[i].seq for i in rows]
        k = proposals.token_ids.shape[1]
        verdict = verified.greedy_verdict if all(s.params.temperature == 0.0 for s in seqs) else None
        if verdict is None:
            tokens, num_accepted = verify(
                verified.logits, proposals.token_ids, proposals.num_tokens, proposals.probs, seqs, self.sampler.generator
            )
            verdict = torch.cat([num_accepted.unsqueeze(1), tokens, proposals.token_ids], dim=1)
        logprobs = self._spec_logprobs(verified.logits, verdict[:, 1 : k + 2], seqs)
        result = verdict.tolist()  # the step's one copy to the host: [accepted, k + 1 tokens, k proposals]
        proposals.host_ids = [row[k + 2 : k + 2 + n] for row, n in zip(result, proposals.num_tokens)]
        self._apply_verdict(seqs, result, proposals.num_tokens, logprobs, touched)
        return verdict

    def _apply_verdict(
        self, seqs: list[Sequence], result: list[list[int]], num_proposed: list[int], logprobs, touched: dict,
        num_fed: int = 0,
    ) -> None:
        """Appends each row's accepted proposals and the target's next token.

        num_fed: the tokens of the step's input not yet counted as computed (a chained step's last
        known token; a synchronous step has counted it in _advance).
        """
        counters = self._spec_counters.setdefault(self.proposer.name, SpecCounters())
        for r, (seq, row) in enumerate(zip(seqs, result)):
            if seq.is_finished:  # a chained step's row: aborted, or finished by the step before
                continue
            accepted = row[0]
            counters.add(num_proposed[r], accepted)
            state = self.requests[seq.request_id]
            touched[state.request_id] = state
            for j, token in enumerate(row[1 : accepted + 2]):
                self._append(state, seq, token, logprobs[r][j] if logprobs else None)
                if seq.is_finished:  # a stop or the length limit: the rest is dropped
                    break
            else:
                # The target's K/V of the accepted proposals are valid now. Those of rejected ones lie
                # past num_computed_tokens: never read, never cached, overwritten by later tokens.
                seq.num_computed_tokens += num_fed + accepted
                self.allocator.cache_full_blocks(seq)

    # ----- chained speculative steps (engine/spec/chain.py) ---------------------------------
    #
    # After a synchronous step whose every row speculated through the verify pass's graph,
    # the next steps of the same rows are launched one ahead, from the device's own verdict: a call
    # launches step N + 1, then reads back step N. The chain stops (and the engine steps
    # synchronously again) when a row finishes, a request waits, a length limit is near or the
    # pool is dry.

    def _start_chain(
        self, sched, rows: list[int], proposals: Proposals, verified: VerifyPassOutput, verdict: torch.Tensor
    ) -> ChainedStep | None:
        seqs = [item.seq for item in sched.scheduled]
        k = self.config.speculative.num_speculative_tokens
        if (
            verified.greedy_verdict is None
            or len(rows) != len(seqs)
            or any(n != k for n in proposals.num_tokens)
            or any(s.params.logprobs is not None for s in seqs)  # computed from logits on the host
            or not self._spec_chain.fits(seqs)
            or any(s.is_finished for s in seqs)
        ):
            return None
        self._spec_chain.begin(seqs, verdict)
        self.proposer.begin_chain(seqs)
        step = self._launch_chained(seqs, in_flight=0)
        if step is None:
            self.proposer.end_chain(seqs)
        return step

    def _launch_chained(self, seqs: list[Sequence], in_flight: int) -> ChainedStep | None:
        """The rows' next step, queued behind `in_flight` (0 or 1) steps whose tokens the host lacks;
        None when the chain must stop."""
        if self.scheduler.waiting:
            return None
        k = self.config.speculative.num_speculative_tokens
        new_blocks = []
        for row, seq in enumerate(seqs):
            # The most tokens the row can hold when this step runs. There must be room after them for
            # k proposals and the target's token, as a synchronous step would propose k there.
            most = seq.num_tokens + in_flight * (k + 1)
            if seq.is_finished or most + k + 1 > seq.max_num_tokens:
                return None
            have = len(seq.blocks)
            if not self.allocator.allocate_slots(seq, most + k - seq.num_computed_tokens):
                return None
            if len(seq.blocks) > have:
                new_blocks.append((row, have, seq.block_ids[have:]))
                self.proposer.blocks_added(seq, have)
        return ChainedStep(seqs, self._spec_chain.launch(new_blocks))

    def _chain_step(self, only_finished: bool, build: Callable[[RequestState], Any]) -> list:
        done = self._chained
        following = self._launch_chained(done.seqs, in_flight=1)
        k = self.config.speculative.num_speculative_tokens
        counters = self._spec_counters.setdefault(self.proposer.name, SpecCounters())
        touched: dict[str, RequestState] = {}
        self._apply_verdict(done.seqs, done.verdict.rows(), [k] * len(done.seqs), None, touched, num_fed=1)
        counters.chained_steps += 1
        if following is not None and any(seq.is_finished for seq in done.seqs):
            # A row ended: read the step in flight back too (its other rows' tokens count) and stop.
            self._apply_verdict(following.seqs, following.verdict.rows(), [k] * len(done.seqs), None, touched, num_fed=1)
            counters.chained_steps += 1
            following = None
        self._chained = following
        if following is None:
            self.proposer.end_chain(done.seqs)
        return self._outputs(touched, only_finished, build)

    def _spec_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]):
        """Per row, the logprobs of the k + 1 tokens it may emit (None when no row asked for any)."""
        if all(s.params.logprobs is None for s in seqs):
            return None
        k1 = logits.shape[1]
        batch = SamplingBatch.from_seqs([s for s in seqs for _ in range(k1)], self.arch.vocab_size, self.device)
        flat: list[TokenLogprob | None] = self.sampler._logprobs(logits.flatten(0, 1), tokens.flatten(), batch)
        return [flat[r * k1 : (r + 1) * k1] for r in range(len(seqs))]

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.proposer is not None:
            self.proposer.release([seq.seq_id])

    def _append(self, state: RequestState, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        self._generation_tokens_total += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = time.monotonic()
        det = state.detokenizers[seq.index]
        stop_string = None
        if det is not None:
            new_text, stop_string = det.add([token])
            state.new_text[seq.index] += new_text
        if stop_string is None and token not in state.stop_ids and len(seq.token_ids) < seq.max_num_tokens:
            return  # the common case: the sequence goes on
        reason = self._finish_reason(seq, token, stop_string)
        if reason is not None:
            if det is not None:
                state.new_text[seq.index] += det.flush()
            seq.finish_reason, seq.stop_reason = reason
            self._finish(seq)
            if state.finished:
                state.metrics.finished_time = time.monotonic()

    def _finish_reason(self, seq: Sequence, token: int, stop_string: str | None) -> tuple[str, str | int | None] | None:
        params = seq.params
        if stop_string is not None:
            return "stop", stop_string
        if token in params.stop_token_ids:
            return "stop", token
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop", None
        if len(seq.token_ids) >= seq.max_num_tokens:  # max_tokens, or the end of the context
            return "length", None
        return None

    def _output(self, state: RequestState) -> RequestOutput:
        completions = [self._completion(state, seq) for seq in state.seqs]
        seqs = state.seqs
        return RequestOutput(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=state.finished,
            num_cached_tokens=seqs[0].num_cached_tokens if len(seqs) == 1 else min(s.num_cached_tokens for s in seqs),
            metrics=state.metrics,
        )

    @staticmethod
    def _completion(state: RequestState, seq: Sequence) -> CompletionOutput:
        """The cumulative output of one sequence, and what it added since the last report."""
        i = seq.index
        out_ids = seq.token_ids[len(seq.prompt_token_ids) :]
        det = state.detokenizers[i]
        wants_logprobs = seq.params.logprobs is not None
        completion = CompletionOutput(
            index=i,
            token_ids=out_ids,
            text=det.text if det is not None else "",
            new_token_ids=out_ids[state.emitted[i] :],
            new_text=state.new_text[i],
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if wants_logprobs else None,
            new_logprobs=seq.logprobs[state.emitted_logprobs[i] :] if wants_logprobs else None,
        )
        state.emitted[i] = len(out_ids)
        state.emitted_logprobs[i] = len(seq.logprobs)
        state.new_text[i] = ""
        return completion

    @staticmethod
    def _delta(state: RequestState) -> RequestDelta:
        """What `_output` would report as new since the last report, without the cumulative parts."""
        choices: list[ChoiceDelta] = []
        for seq in state.seqs:
            i = seq.index
            start = len(seq.prompt_token_ids)
            wants_logprobs = seq.params.logprobs is not None
            choices.append((
                i,
                seq.token_ids[start + state.emitted[i] :],
                state.new_text[i],
                seq.finish_reason,
                seq.stop_reason,
                seq.logprobs[state.emitted_logprobs[i] :] if wants_logprobs else None,
            ))
            state.emitted[i] = len(seq.token_ids) - start
            state.emitted_logprobs[i] = len(seq.logprobs)
            state.new_text[i] = ""
        seqs = state.seqs
        num_cached = seqs[0].num_cached_tokens if len(seqs) == 1 else min(s.num_cached_tokens for s in seqs)
        return state.request_id, state.finished, num_cached, state.metrics if state.finished else None, choices

    # ----- conveniences -------------------------------------------------------------

    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Runs the prompts to completion; outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        base = self._seq_ids.new()
        ids = [f"generate-{base}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while any(rid not in final for rid in ids):
            for out in self.step(only_finished=True):
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def stats(self) -> EngineStats:
        s = self.allocator.stats
        name = self.proposer.name if self.proposer is not None else None
        spec = self._spec_counters.get(name, SpecCounters()) if name else SpecCounters()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.allocator.usage,
            num_free_blocks=self.allocator.num_free_blocks,
            prefix_cache_hit_rate=s.hit_rate,
            prefix_cache_queried_tokens=s.queried_tokens,
            prefix_cache_hit_tokens=s.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            spec_proposer=name,
            spec_steps=spec.steps,
            spec_proposed_tokens=spec.proposed,
            spec_accepted_tokens=spec.accepted,
            spec_acceptance_rate=spec.accepted / spec.proposed if spec.proposed else 0.0,
            spec_mean_accepted_tokens_per_step=spec.accepted / spec.steps if spec.steps else 0.0,
            spec_mean_tokens_per_step=(spec.accepted + spec.steps) / spec.steps if spec.steps else 0.0,
            spec_chained_steps=spec.chained_steps,
            steps_total=self._steps.steps,
            prompt_steps_total=self._steps.prompt_steps,
            step_seqs_total=self._steps.seqs,
        )

    def cached_block_hashes(self) -> list[int]:
        """Hashes of the blocks this engine can serve from its prefix cache (for the router)."""
        return self.allocator.pool.cached_hashes()

    def cached_block_changes(self, full: bool = False) -> CacheChanges:
        """What cached_block_hashes gained and lost since the last call (one caller: the router's feed)."""
        return self.allocator.pool.cached_hash_changes(full)

    # ----- sizing ---------------------------------------------------------------------

    def _num_kv_blocks(self, draft_arch=None) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        elem = torch.empty((), dtype=self.dtype).element_size()
        block_bytes = 2 * self.arch.num_layers * self.arch.num_kv_heads * self.arch.head_dim * elem * cache.block_size
        if draft_arch is not None:  # a co-located draft keeps a cache of the same blocks
            block_bytes += 2 * draft_arch.num_layers * draft_arch.num_kv_heads * draft_arch.head_dim * elem * cache.block_size
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for activations and the logits of a full decode batch (fp32, several copies).
            reserve = (1 - cache.gpu_memory_utilization) * total + 2**30
            reserve += 4 * self.config.scheduler.max_num_seqs * self.arch.vocab_size * 4
            reserve += 16 * self.config.scheduler.max_num_batched_tokens * self.arch.intermediate_size * elem
            spec = self.config.speculative
            if spec.enabled:  # verify logits, draft distributions and noise of the largest spec graph
                rows = min(self.config.scheduler.max_num_seqs, SPEC_GRAPH_MAX_BATCH) * (spec.num_speculative_tokens + 1)
                reserve += 6 * rows * self.arch.vocab_size * 4
            budget = free - reserve
        else:
            budget = cache.cpu_kv_cache_bytes
        num_blocks = int(budget // block_bytes)
        if num_blocks < 2:
            raise ConfigError(
                f"no room for the KV cache: {budget / 2**30:.2f} GiB left for it on {self.device}; "
                "raise cache.gpu_memory_utilization, free the device, or set cache.num_blocks"
            )
        return num_blocks
