"""MixedStepGraphs: the pieces between attention calls give the model's own forward pass.

On the CPU the pieces run eagerly (capture=False): the same code, buffers and
padding a CUDA graph replays; bench/engine_check.py checks the captured graphs
on the GPU against Hugging Face.
"""

import pytest
import torch

from engine import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from engine.engine import LLMEngine
from engine.mixed_graphs import MixedStepGraphs, token_buckets


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="preset:tiny-llama", device="cpu", dtype="float32", seed=0,
            cache=CacheConfig(block_size=4, num_blocks=64), scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        )
    )


def mixed_step(engine: LLMEngine):
    """A step with two decoding sequences and a new prompt of 13 tokens: 15 tokens in all."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request("a", list(range(5, 12)), params)
    engine.add_request("b", list(range(20, 29)), params)
    engine.step()  # both prompts
    engine.add_request("c", list(range(40, 53)), params)
    sched = engine.scheduler.schedule()
    assert sorted(it.num_new_tokens for it in sched.scheduled) == [1, 1, 13]
    return sched, engine.runner.prepare(sched)


def test_token_buckets_grow_by_half_or_a_third_up_to_the_limit():
    assert token_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    assert token_buckets(64) == [16, 24, 32, 48, 64]
    assert token_buckets(8) == [8]


def test_the_pieces_give_the_model_forward_and_pads_write_only_the_null_block(engine):
    _, inputs = mixed_step(engine)
    kv = engine.kv_cache
    want = engine.model(inputs.input_ids, inputs.positions, kv, inputs.meta).clone()
    cache_after_forward = kv.clone()
    # The step's own K/V must come back from the pieces' writes.
    flat = kv.view(kv.shape[0], 2, -1, *kv.shape[-2:])
    flat[:, :, inputs.meta.slot_mapping] = 0.0
    graphs = MixedStepGraphs(engine.model, kv, max_tokens=64, capture=False)
    graphs.input_ids.fill_(7)  # stale rows from an earlier step: the pads must not care
    graphs.positions.fill_(3)
    graphs.slot_mapping.fill_(9)  # a real slot: a pad that kept it would overwrite a block in use
    got = graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
    assert got.shape == want.shape == (15, engine.arch.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Every block but the null one (where the 1 pad row of bucket 16 writes) as the plain forward left it.
    torch.testing.assert_close(kv[:, :, 1:], cache_after_forward[:, :, 1:], rtol=1e-5, atol=1e-5)
    assert (kv[:, :, 2] != 0).any()  # slot 9's block holds K/V (so a stray write would show)
    for rid in "abc":
        engine.abort_request(rid)


def test_a_step_past_the_largest_bucket_does_not_fit(engine):
    graphs = MixedStepGraphs(engine.model, engine.kv_cache, max_tokens=32, capture=False)
    assert graphs.fits(32) and not graphs.fits(33)
