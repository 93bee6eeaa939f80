"""The draft model's own bookkeeping: cache reuse, mixed temperatures, and the draft service."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams, SpeculativeConfig
from engine.spec.draft_service import DraftCall, DraftService

BS = 4


def _rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_rand_tokens(n, 50 + n) for n in (3, 9, 22, 41)]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def spy_starts(engine) -> list[list[int]]:
    """Records, per propose call, where each sequence's catch-up started."""
    calls: list[list[int]] = []
    draft = engine.proposer.draft
    inner = draft.propose
    draft.propose = lambda seqs, starts, ks: calls.append(list(starts)) or inner(seqs, starts, ks)
    return calls


def test_draft_reuses_its_cached_prefix_blocks(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, block_size=BS, speculative=SpeculativeConfig(method="draft", draft_model=str(llama_ckpt)))
    first = engine.generate(PROMPTS, GREEDY)
    starts = spy_starts(engine)
    second = engine.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
    # New sequences start their catch-up after the prompt blocks the draft computed the first time.
    assert starts[0] == [(len(p) - 1) // BS * BS for p in PROMPTS]
    assert engine.stats().spec_acceptance_rate == 1.0  # reused K/V are right: the self-draft is never wrong


def test_preemption_then_resume_keeps_the_self_draft_exact(llama_ckpt, make_engine):
    engine = make_engine(
        llama_ckpt, block_size=BS, num_blocks=40, max_num_batched_tokens=16,
        speculative=SpeculativeConfig(method="draft", draft_model=str(llama_ckpt)),
    )
    engine.generate(PROMPTS * 2, GREEDY)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.spec_acceptance_rate == 1.0


def test_mixed_temperatures_in_one_batch(llama_ckpt, noisy_draft, make_engine):
    plain = make_engine(llama_ckpt, block_size=BS)
    engine = make_engine(llama_ckpt, block_size=BS, speculative=SpeculativeConfig(method="draft", draft_model=str(noisy_draft)))
    hot = SamplingParams(max_tokens=20, temperature=1.2, top_p=0.9, ignore_eos=True)
    params = [GREEDY, hot, GREEDY, hot]
    out = engine.generate(PROMPTS, params)
    ref = plain.generate(PROMPTS, GREEDY)
    for o, r, p in zip(out, ref, params):
        assert len(o.outputs[0].token_ids) == 20
        if p is GREEDY:
            assert o.outputs[0].token_ids == r.outputs[0].token_ids


# ----- the draft service (what the Serve deployment runs) -----------------------------------


@pytest.fixture
def service(llama_ckpt):
    def make(**kw) -> DraftService:
        kw = {"dtype": "float32", "device": "cpu", "block_size": BS, "num_blocks": 64, **kw}
        return DraftService(str(llama_ckpt), 3, **kw)

    return make


def test_service_proposes_the_greedy_continuation(service, llama_ckpt, make_engine):
    ref = make_engine(llama_ckpt, block_size=BS).generate(PROMPTS, GREEDY)
    svc = service()
    calls = [DraftCall(f"s{i}", list(p), 3) for i, p in enumerate(PROMPTS)]
    reply = svc.propose(calls)
    assert reply.token_ids == [r.outputs[0].token_ids[:3] for r in ref]
    assert reply.top_ids is None
    # The caller kept 2 of 3 and added its own token: only the new tokens are computed next time.
    for call, r in zip(calls, ref):
        call.token_ids += r.outputs[0].token_ids[:3]
    reply = svc.propose(calls)
    assert reply.token_ids == [r.outputs[0].token_ids[3:6] for r in ref]
    shadows = svc._shadows
    assert [s.seq.num_computed_tokens for s in shadows.values()] == [len(p) + 3 for p in PROMPTS]
    # A sequence that is not a continuation starts over; released keys are dropped.
    reply = svc.propose([DraftCall("s0", PROMPTS[1] + ref[1].outputs[0].token_ids[:3], 3)], release=["s1", "s2"])
    assert reply.token_ids == [ref[1].outputs[0].token_ids[3:6]]
    assert set(svc._shadows) == {"s0", "s3"}
    assert svc._shadows["s0"].seq.num_cached_tokens == 0


def test_service_prefix_cache_and_eviction(service):
    svc = service(num_blocks=24)  # 23 usable blocks of 4 tokens
    long = _rand_tokens(40, 1)
    assert svc.propose([DraftCall("a", long, 3)]).token_ids[0]
    # Another key with the same prompt starts from the cached blocks.
    svc.propose([DraftCall("b", long, 3)])
    b = svc._shadows["b"].seq
    assert b.block_ids[:9] == svc._shadows["a"].seq.block_ids[:9]
    # A call that needs more blocks than are free evicts the least recently used other sequences.
    other = _rand_tokens(60, 2)
    reply = svc.propose([DraftCall("c", other, 3)])
    assert len(reply.token_ids[0]) == 3 and "a" not in svc._shadows
    # One that cannot fit at all gets no proposals, and nothing breaks.
    assert svc.propose([DraftCall("d", _rand_tokens(200, 3), 3)]).token_ids == [[]]


def test_service_sampled_proposals_carry_their_distribution(service):
    svc = service(probs_top_k=5)
    calls = [DraftCall("x", PROMPTS[2], 3, temperature=1.0), DraftCall("y", PROMPTS[3], 3, temperature=0.0)]
    reply = svc.propose(calls)
    assert reply.top_ids.shape == (2, 3, 5)
    dense = reply.dense_probs(384, 3, torch.device("cpu"))
    torch.testing.assert_close(dense[0].sum(-1), torch.ones(3))
    for j, token in enumerate(reply.token_ids[0]):
        assert dense[0, j, token] > 0  # drawn from the distribution it reports
    assert (dense[0] > 0).sum(-1).tolist() == [5, 5, 5]


def test_batch_bucket_padding(llama_ckpt, noisy_draft, make_engine):
    """The padded rows of the GPU's graph buckets, run eagerly on the CPU, change nothing."""
    from engine.cuda_graphs import batch_buckets

    plain = make_engine(llama_ckpt, block_size=BS)
    for draft in (llama_ckpt, noisy_draft):
        engine = make_engine(llama_ckpt, block_size=BS, speculative=SpeculativeConfig(method="draft", draft_model=str(draft)))
        engine.proposer.draft.use_buckets(8)
        engine.runner.verify_pass.buckets = batch_buckets(8)
        prompts = PROMPTS + PROMPTS[:1]  # 5 sequences: bucket 8, three idle rows
        out = engine.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY)]
        if draft is llama_ckpt:
            assert engine.stats().spec_acceptance_rate == 1.0
        hot = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
        assert all(len(o.outputs[0].token_ids) == 20 for o in engine.generate(prompts, [GREEDY, hot] * 2 + [hot]))
