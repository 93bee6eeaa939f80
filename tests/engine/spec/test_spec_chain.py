"""Chained speculative steps (engine/spec/chain.py), fp32 on the CPU: async scheduling with the draft.

Each chained step's inputs are computed from the previous step's verdict on the
device; the host reads that verdict one step later. Greedy outputs must still equal
plain greedy decoding token for token, for drafts that are always, often and
seldom right, under preemption and the prefix cache; sampled ones must equal the
synchronous speculative steps' for seeded requests; the chain must stop for a
finished, aborted or newly arrived request and leave every block as a
synchronous step would.
"""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from test_spec_engine import (  # noqa: F401 (reference: a fixture)
    BS, GREEDY, MAX_NEW, PROMPTS, assert_all_blocks_free, reference, run_checked, spec_config, token_ids,
)


def chained_engine(make_engine, target, draft, k: int = 3, **kwargs):
    engine = make_engine(target, block_size=BS, speculative=spec_config("draft", draft, k), async_scheduling=True, **kwargs)
    assert engine._spec_chain is not None
    return engine


@pytest.fixture
def drafts(llama_ckpt, noisy_draft, small_draft):
    return {"self": llama_ckpt, "noisy": noisy_draft, "small": small_draft}


@pytest.mark.parametrize("draft", ["self", "noisy", "small"])
def test_chained_greedy_equals_no_speculation(draft, drafts, llama_ckpt, make_engine, reference):
    engine = chained_engine(make_engine, llama_ckpt, drafts[draft], num_blocks=512)
    assert token_ids(run_checked(engine, PROMPTS, GREEDY)) == reference(PROMPTS)
    # Again, now from the prefix cache (the draft's K/V of the cached blocks too), one prompt at a time.
    for prompt in PROMPTS:
        assert token_ids(run_checked(engine, [prompt], GREEDY)) == reference([prompt])
    stats = engine.stats()
    assert stats.spec_chained_steps > stats.spec_steps / 3
    if draft == "self":
        assert stats.spec_acceptance_rate == 1.0
    assert_all_blocks_free(engine)


def test_one_sequence_chains_from_its_second_speculative_step(llama_ckpt, noisy_draft, make_engine, reference):
    engine = chained_engine(make_engine, llama_ckpt, noisy_draft, k=2)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    out = run_checked(engine, [PROMPTS[4]], params)
    assert token_ids(out) == reference([PROMPTS[4]], params)
    stats = engine.stats()
    # The prompt step, one synchronous speculative step; then chained ones, but the last few
    # (the length limit within reach of the step in flight) run synchronously.
    assert stats.spec_steps - stats.spec_chained_steps <= 1 + 3
    assert stats.spec_chained_steps >= 8


def test_chained_under_chunked_prefill_and_preemption(llama_ckpt, noisy_draft, make_engine, reference):
    engine = chained_engine(make_engine, llama_ckpt, noisy_draft, num_blocks=48, max_num_batched_tokens=16)
    prompts = PROMPTS + PROMPTS[2:5]
    assert token_ids(run_checked(engine, prompts, GREEDY)) == reference(prompts)
    assert engine.stats().num_preemptions > 0 and engine.stats().spec_chained_steps > 0
    assert_all_blocks_free(engine)


def test_chained_steps_leave_only_computed_kv_in_the_cache(llama_ckpt, noisy_draft, make_engine):
    spec = chained_engine(make_engine, llama_ckpt, noisy_draft)
    plain = make_engine(llama_ckpt, block_size=BS)
    outs = [spec.generate([p], GREEDY)[0] for p in PROMPTS]  # one at a time: long chains
    assert spec.stats().spec_chained_steps > 20
    plain.generate([p + o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)], SamplingParams(max_tokens=1))
    spec_blocks = {b.block_hash: b.block_id for b in spec.allocator.pool.blocks if b.block_hash is not None}
    plain_blocks = {b.block_hash: b.block_id for b in plain.allocator.pool.blocks if b.block_hash is not None}
    assert len(spec_blocks) > 20 and set(spec_blocks) <= set(plain_blocks)
    for h, block in spec_blocks.items():
        torch.testing.assert_close(spec.kv_cache[:, :, block], plain.kv_cache[:, :, plain_blocks[h]], atol=1e-4, rtol=1e-4)


def steps_until_chained(engine, limit: int = 20) -> list:
    outputs = []
    for _ in range(limit):
        outputs.extend(engine.step())
        if engine._chained is not None:
            return outputs
    raise AssertionError("the engine never chained a step")


def test_abort_and_arrival_end_the_chain(llama_ckpt, noisy_draft, make_engine, reference):
    engine = chained_engine(make_engine, llama_ckpt, noisy_draft)
    engine.add_request("a", PROMPTS[3], GREEDY)
    engine.add_request("b", PROMPTS[5], GREEDY)
    steps_until_chained(engine)
    engine.abort_request("a")  # its row is still in the step in flight
    engine.step()
    assert engine._chained is None
    engine.add_request("c", PROMPTS[4], GREEDY)  # arrives while "b" chains again
    steps_until_chained(engine)
    engine.add_request("d", PROMPTS[2], GREEDY)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    assert "a" not in final
    assert [final["b"], final["c"], final["d"]] == reference([PROMPTS[5], PROMPTS[4], PROMPTS[2]])
    assert_all_blocks_free(engine)


def test_stops_and_length_limits_inside_chained_steps(llama_ckpt, make_engine, reference):
    engine = chained_engine(make_engine, llama_ckpt, llama_ckpt, k=5)
    ref = reference(PROMPTS)
    for i, (prompt, want) in enumerate(zip(PROMPTS, ref)):
        if i % 2:
            params = SamplingParams(max_tokens=11 + i, temperature=0, ignore_eos=True)
            expected, reason = want[: 11 + i], "length"
        else:
            params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, stop_token_ids=[want[17]])
            expected, reason = want[: want.index(want[17]) + 1], "stop"
        got = run_checked(engine, [prompt], params)[0].outputs[0]
        assert got.token_ids == expected and got.finish_reason == reason
    assert engine.stats().spec_chained_steps > 0
    assert_all_blocks_free(engine)


def test_logprob_requests_step_synchronously(llama_ckpt, noisy_draft, make_engine):
    engine = chained_engine(make_engine, llama_ckpt, noisy_draft)
    engine.generate(PROMPTS[3:5], SamplingParams(max_tokens=16, temperature=0, logprobs=1, ignore_eos=True))
    engine.generate(PROMPTS[3:5], SamplingParams(max_tokens=16, temperature=0.8, seed=1, logprobs=0, ignore_eos=True))
    stats = engine.stats()
    assert stats.spec_steps > 0 and stats.spec_chained_steps == 0


def seeded(i: int, **cut) -> SamplingParams:
    return SamplingParams(max_tokens=40, temperature=0.8, seed=1000 + i, ignore_eos=True, **cut)


@pytest.mark.parametrize(
    "draft, cut", [("self", {}), ("noisy", {}), ("small", {}), ("noisy", {"top_k": 20}), ("noisy", {"top_p": 0.8})]
)
def test_chained_sampling_equals_synchronous_sampling(draft, cut, drafts, llama_ckpt, make_engine):
    """A chained sampled step is the synchronous step computed ahead on the device, with the same
    noise: seeded requests (beside greedy ones in the same batch, and beside rows cut to a top-k or
    top-p) get the same tokens either way."""
    greedy_params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    params = [[greedy_params, seeded(i), seeded(i, **cut)][i % 3] for i in range(len(PROMPTS))]
    outs = {}
    for chained in (False, True):
        engine = make_engine(
            llama_ckpt, block_size=BS, num_blocks=512, speculative=spec_config("draft", drafts[draft]),
            async_scheduling=chained,
        )
        outs[chained] = token_ids(run_checked(engine, PROMPTS, params))
        # About ten speculative steps for 40 tokens: most of them chained, or none.
        assert (engine.stats().spec_chained_steps >= 5) == chained, engine.stats()
        assert_all_blocks_free(engine)
    assert outs[True] == outs[False]
    # Sampling, not greedy decoding: the seeded rows leave the greedy path somewhere.
    greedy = token_ids(run_checked(engine, PROMPTS, greedy_params))
    assert all(outs[True][i] != greedy[i] for i in range(len(PROMPTS)) if i % 3)


def test_chained_sampling_with_the_target_as_draft_accepts_everything(llama_ckpt, make_engine):
    """p = q at every proposal: the accept test u * q < p always passes; a draft distribution that
    was not the one the proposals were drawn from (or a target one at the wrong position) would not."""
    engine = chained_engine(make_engine, llama_ckpt, llama_ckpt, k=3, num_blocks=512)
    engine.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True))
    stats = engine.stats()
    assert stats.spec_chained_steps >= 5, stats  # of the ten steps for 40 tokens
    assert stats.spec_acceptance_rate > 0.99, stats


@pytest.mark.parametrize("chained", [False, True])
def test_the_draft_fills_a_prompt_once_then_only_catches_up(chained, llama_ckpt, noisy_draft, make_engine, reference):
    """Past a new prompt, the draft's cache lacks at most two tokens per step, synchronous or chained,
    so no step needs the fill pass again (its bookkeeping of what it holds stays exact)."""
    engine = make_engine(
        llama_ckpt, block_size=BS, speculative=spec_config("draft", noisy_draft), async_scheduling=chained
    )
    draft = engine.proposer.draft
    fills = []
    fill = draft._fill_to_last_two
    draft._fill_to_last_two = lambda seqs, starts: fills.append(len(seqs)) or fill(seqs, starts)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = PROMPTS[2:6]
    for prompt in prompts:
        assert token_ids(engine.generate([prompt], params)) == reference([prompt], params)
    assert fills == [1] * len(prompts)
    assert (engine.stats().spec_chained_steps > 0) == chained
