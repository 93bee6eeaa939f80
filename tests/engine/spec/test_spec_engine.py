"""The engine with speculation on, fp32 on the CPU.

At temperature 0 the output must equal the output without speculation,
token for token, for every proposer; under chunked prefill, preemption and
prefix caching; with stops, length limits and logprobs. Rejected proposals
must leave nothing a later step or request could read. Speculation can be
switched off per request, and the engine counts what was proposed and kept.
"""

from __future__ import annotations

import pytest
import torch

from engine import ConfigError, SamplingParams, SpeculativeConfig

BS = 4
K = 3
MAX_NEW = 24


def _rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


COMMON = _rand_tokens(40, 100)
PROMPTS = [_rand_tokens(n, n) for n in (1, 2, 5, 17, 33, 64)] + [COMMON + _rand_tokens(3, 1), COMMON + _rand_tokens(9, 2)]
# A prompt that repeats itself, so n-gram lookup finds something to propose (random models do not
# repeat themselves, so its proposals are rejected: test_oracle_proposals covers acceptance).
PROMPTS.append(_rand_tokens(6, 7) * 4)
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


def spec_config(method: str, draft=None, k: int = K) -> SpeculativeConfig:
    return SpeculativeConfig(method=method, draft_model=str(draft) if draft else None, num_speculative_tokens=k)


@pytest.fixture
def drafts(llama_ckpt, noisy_draft, small_draft):
    return {
        "self": spec_config("draft", llama_ckpt),
        "noisy": spec_config("draft", noisy_draft),
        "small": spec_config("draft", small_draft),
        "ngram": spec_config("ngram"),
    }


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def run_checked(engine, prompts, params):
    """generate(), checking after every step that no cached block holds an uncomputed token."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params if isinstance(params, list) else [params] * len(prompts)):
        engine.add_request(rid, prompt, p)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        for seq in engine.scheduler.running:
            assert seq.num_computed_tokens < seq.num_tokens
            assert len(seq.block_hashes) * BS <= seq.num_computed_tokens
    return [final[r] for r in ids]


def assert_all_blocks_free(engine):
    stats = engine.stats()
    assert stats.num_free_blocks == engine.allocator.pool.num_usable_blocks
    assert stats.num_running == 0 and stats.num_waiting == 0


@pytest.fixture(scope="module")
def reference(llama_ckpt):
    """Greedy outputs without speculation (equal to transformers', see tests/engine/test_engine.py)."""
    from engine import CacheConfig, EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(llama_ckpt), dtype="float32", device="cpu", cache=CacheConfig(block_size=BS, num_blocks=512)))
    memo: dict = {}

    def get(prompts, params=GREEDY):
        key = (tuple(map(tuple, prompts)), repr(params))
        if key not in memo:
            memo[key] = token_ids(engine.generate(prompts, params))
        return memo[key]

    return get


@pytest.mark.parametrize("proposer", ["self", "noisy", "small", "ngram"])
def test_greedy_equals_no_speculation(proposer, drafts, llama_ckpt, make_engine, reference):
    engine = make_engine(llama_ckpt, block_size=BS, num_blocks=512, speculative=drafts[proposer])
    first = run_checked(engine, PROMPTS, GREEDY)
    assert token_ids(first) == reference(PROMPTS)
    assert all(o.outputs[0].finish_reason == "length" for o in first)
    # Again: now the prompts' blocks come from the prefix cache (the draft's K/V of them too).
    second = run_checked(engine, PROMPTS, GREEDY)
    assert token_ids(second) == reference(PROMPTS)
    assert sum(o.num_cached_tokens for o in second) > 0
    assert_all_blocks_free(engine)
    stats = engine.stats()
    assert stats.spec_proposer == ("ngram" if proposer == "ngram" else "draft")
    assert stats.spec_steps > 0 and stats.spec_proposed_tokens > 0
    assert stats.spec_acceptance_rate == stats.spec_accepted_tokens / stats.spec_proposed_tokens
    assert stats.spec_mean_tokens_per_step == pytest.approx(1 + stats.spec_accepted_tokens / stats.spec_steps)
    if proposer == "self":
        assert stats.spec_acceptance_rate == 1.0
    if proposer == "noisy":
        assert 0.2 < stats.spec_acceptance_rate < 0.95  # both outcomes are exercised


@pytest.mark.parametrize("proposer", ["self", "noisy", "small", "ngram"])
def test_greedy_equal_under_chunked_prefill_and_preemption(proposer, drafts, llama_ckpt, make_engine, reference):
    engine = make_engine(
        llama_ckpt, block_size=BS, num_blocks=48, max_num_batched_tokens=16, speculative=drafts[proposer]
    )
    prompts = PROMPTS + PROMPTS[2:5]
    out = run_checked(engine, prompts, GREEDY)
    assert token_ids(out) == reference(prompts)
    assert engine.stats().num_preemptions > 0
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_greedy_equal_for_any_k(k, llama_ckpt, noisy_draft, make_engine, reference):
    engine = make_engine(llama_ckpt, block_size=BS, speculative=spec_config("draft", noisy_draft, k))
    assert token_ids(run_checked(engine, PROMPTS, GREEDY)) == reference(PROMPTS)


def test_rejected_proposals_leave_no_cached_kv(llama_ckpt, noisy_draft, make_engine):
    """Every block the prefix cache holds after speculation has exactly the K/V of its tokens."""
    spec = make_engine(llama_ckpt, block_size=BS, speculative=spec_config("draft", noisy_draft))
    plain = make_engine(llama_ckpt, block_size=BS)
    outs = spec.generate(PROMPTS, GREEDY)
    assert spec.stats().spec_accepted_tokens < spec.stats().spec_proposed_tokens  # there were rejections
    plain.generate([p + o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)], SamplingParams(max_tokens=1))
    spec_blocks = {b.block_hash: b.block_id for b in spec.allocator.pool.blocks if b.block_hash is not None}
    plain_blocks = {b.block_hash: b.block_id for b in plain.allocator.pool.blocks if b.block_hash is not None}
    assert len(spec_blocks) > 20
    # Blocks that held rejected proposals are cached only once full of computed tokens; each cached
    # block must then hold exactly what a plain prefill of the same tokens computes.
    assert set(spec_blocks) <= set(plain_blocks)
    for h, block in spec_blocks.items():
        torch.testing.assert_close(spec.kv_cache[:, :, block], plain.kv_cache[:, :, plain_blocks[h]], atol=1e-4, rtol=1e-4)
    # And a request that continues from the cached blocks gets the no-speculation answer.
    longer = [p + o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)]
    assert token_ids(spec.generate(longer, GREEDY)) == token_ids(plain.generate(longer, GREEDY))


def test_stops_and_length_cut_accepted_runs(llama_ckpt, make_engine, reference):
    """A stop token or max_tokens inside an accepted run ends the output right there."""
    engine = make_engine(llama_ckpt, block_size=BS, speculative=spec_config("draft", llama_ckpt, k=5))
    ref = reference(PROMPTS)
    params = []
    for i, out in enumerate(ref):
        if i % 2:
            params.append(SamplingParams(max_tokens=7 + i, temperature=0, ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, stop_token_ids=[out[9]]))
    got = run_checked(engine, PROMPTS, params)
    for i, (o, r) in enumerate(zip(got, ref)):
        comp = o.outputs[0]
        if i % 2:
            assert comp.token_ids == r[: 7 + i] and comp.finish_reason == "length"
        else:
            cut = r.index(r[9]) + 1
            assert comp.token_ids == r[:cut] and comp.finish_reason == "stop" and comp.stop_reason == r[9]
    assert_all_blocks_free(engine)


def test_logprobs_with_speculation(llama_ckpt, noisy_draft, make_engine):
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    spec = make_engine(llama_ckpt, block_size=BS, speculative=spec_config("draft", noisy_draft))
    plain = make_engine(llama_ckpt, block_size=BS)
    a = spec.generate(PROMPTS[3:6], params)
    b = plain.generate(PROMPTS[3:6], params)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert len(x.outputs[0].logprobs) == 12
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.token_id == ly.token_id and list(lx.top) == list(ly.top)
            assert lx.logprob == pytest.approx(ly.logprob, abs=1e-4)


def test_speculation_off_per_request(llama_ckpt, noisy_draft, make_engine, reference):
    engine = make_engine(llama_ckpt, block_size=BS, speculative=spec_config("draft", noisy_draft))
    calls = []
    propose = engine.proposer.propose
    engine.proposer.propose = lambda batch: calls.append([r.seq.request_id for r in batch]) or propose(batch)
    off = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, use_speculation=False)
    out = run_checked(engine, PROMPTS, off)
    assert token_ids(out) == reference(PROMPTS)
    assert calls == [] and engine.stats().spec_steps == 0
    # Mixed: only the requests that allow it are proposed for, and outputs stay the same.
    params = [off if i % 2 else GREEDY for i in range(len(PROMPTS))]
    out = run_checked(engine, PROMPTS, params)
    assert token_ids(out) == reference(PROMPTS)
    proposed_for = {rid for batch in calls for rid in batch}
    assert proposed_for == {f"r{i}" for i in range(0, len(PROMPTS), 2)}


def test_seeded_sampling_is_reproducible_with_speculation(llama_ckpt, noisy_draft, make_engine):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=50, seed=7, ignore_eos=True)
    mates = SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True)
    alone = make_engine(llama_ckpt, block_size=BS, speculative=spec_config("draft", noisy_draft))
    ref = alone.generate([PROMPTS[4]], params)[0].outputs[0].token_ids
    crowd = make_engine(llama_ckpt, block_size=BS, speculative=spec_config("draft", noisy_draft))
    outs = crowd.generate(PROMPTS[:4] + [PROMPTS[4]], [mates] * 4 + [params])
    assert outs[4].outputs[0].token_ids == ref
    assert crowd.stats().spec_steps > 0


def test_config_errors(llama_ckpt, make_engine):
    with pytest.raises(ConfigError, match="needs a proposer"):
        make_engine(llama_ckpt, speculative=SpeculativeConfig(method="remote"))
    from engine.spec.ngram import NgramProposer

    with pytest.raises(ConfigError, match="speculative.method is 'none'"):
        from engine import CacheConfig, EngineConfig, LLMEngine

        LLMEngine(EngineConfig(model=str(llama_ckpt), device="cpu", cache=CacheConfig(num_blocks=16)), proposer=NgramProposer(SpeculativeConfig(), torch.device("cpu")))
    with pytest.raises(ConfigError, match="draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ConfigError, match="ngram_min"):
        SpeculativeConfig(method="ngram", ngram_min=3, ngram_max=2)


class OracleProposer:
    """Proposes the known greedy continuation, wrong at chosen output positions."""

    name = "oracle"

    def __init__(self, answers: dict[str, list[int]], wrong_at: set[int], k: int) -> None:
        self.answers, self.wrong_at, self.k = answers, wrong_at, k
        self.released: list[int] = []

    def propose(self, batch):
        from engine.spec.proposer import Proposals

        rows = []
        for r in batch:
            seq = r.seq
            done = seq.num_output_tokens
            guess = self.answers[seq.request_id][done : done + r.num_tokens]
            rows.append([(t + 1) % 384 if done + j in self.wrong_at else t for j, t in enumerate(guess)])
        return Proposals.from_lists(rows, self.k, torch.device("cpu"))

    def release(self, seq_ids):
        self.released.extend(seq_ids)


def test_oracle_proposals_accepted_up_to_the_first_wrong_one(llama_ckpt, make_engine, reference):
    from engine import CacheConfig, EngineConfig, LLMEngine

    ref = reference(PROMPTS)
    k = 4
    answers = {f"r{i}": out for i, out in enumerate(ref)}
    proposer = OracleProposer(answers, wrong_at={2, 11, 12}, k=k)
    engine = LLMEngine(
        EngineConfig(
            model=str(llama_ckpt), dtype="float32", device="cpu", cache=CacheConfig(block_size=BS, num_blocks=256),
            speculative=SpeculativeConfig(method="remote", num_speculative_tokens=k),
        ),
        proposer=proposer,
    )
    out = run_checked(engine, PROMPTS, GREEDY)
    assert token_ids(out) == ref
    # Output positions per step, from 0: [0..2] (2 wrong: 2 accepted + the fix), [3..7] (4 + bonus),
    # [8..11] (11 wrong: 3 + fix), [12] (12 wrong: 0 + fix), [13..17], [18..22], [23] (the last: no proposal).
    stats = engine.stats()
    n = len(PROMPTS)
    assert stats.spec_steps == 6 * n
    assert stats.spec_accepted_tokens == (2 + 4 + 3 + 0 + 4 + 4) * n
    assert stats.spec_proposed_tokens == 6 * k * n
    assert len(proposer.released) == n  # every finished sequence was released once
