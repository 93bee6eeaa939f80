"""LLMEngine end to end on tiny random checkpoints, fp32 on the CPU.

Greedy output is checked token for token against transformers' `generate`
under prefix caching on and off, forced chunked prefill and forced
preemption; then request validation, abort, stopping rules, n > 1, seeds,
logprobs and text with stop strings.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine import InvalidRequestError, SamplingParams
from engine.model.dense import forward_full_sequence

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")
BS = 4
MAX_NEW = 24


def _rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


COMMON = _rand_tokens(40, 100)  # a shared 10-block prefix
PROMPTS = [_rand_tokens(n, n) for n in (1, 5, 17, 33, 64)] + [COMMON + _rand_tokens(3, 1), COMMON + _rand_tokens(9, 2)]
EXTRA = COMMON + _rand_tokens(5, 3)
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def run_steps(engine, prompts, params):
    """add_request + step until done; final outputs in prompt order, the step each request got its first token."""
    ids = [f"req-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    final, first_token_step, step = {}, {}, 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            first_token_step.setdefault(out.request_id, step)
            if out.finished:
                final[out.request_id] = out
        assert step < 1000
    return [final[r] for r in ids], [first_token_step[r] for r in ids]


def assert_all_blocks_free(engine):
    stats = engine.stats()
    assert stats.num_free_blocks == engine.allocator.pool.num_usable_blocks
    assert stats.kv_cache_usage == 0.0
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert not engine.has_unfinished_requests()


# ----- greedy == transformers ---------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_matches_hf_with_prefix_caching(preset, tiny_checkpoint, hf_greedy, make_engine):
    ref = [hf_greedy(preset, p, MAX_NEW) for p in PROMPTS]
    engine = make_engine(tiny_checkpoint(preset), block_size=BS, num_blocks=512)
    first = engine.generate(PROMPTS, GREEDY)
    assert token_ids(first) == ref
    assert all(o.outputs[0].finish_reason == "length" for o in first)
    # All were admitted in one step, so nothing was cached for them yet.
    assert [o.num_cached_tokens for o in first] == [0] * len(PROMPTS)

    second = engine.generate(PROMPTS + [EXTRA], GREEDY)
    assert token_ids(second) == ref + [hf_greedy(preset, EXTRA, MAX_NEW)]
    # Every full block but the one holding the last prompt token comes from the cache.
    assert [o.num_cached_tokens for o in second] == [(len(p) - 1) // BS * BS for p in PROMPTS] + [len(COMMON)]
    stats = engine.stats()
    assert stats.prefix_cache_hit_tokens == sum(o.num_cached_tokens for o in second) > 0
    assert 0 < stats.prefix_cache_hit_rate < 1
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_matches_hf_without_prefix_caching(preset, tiny_checkpoint, hf_greedy, make_engine):
    ref = [hf_greedy(preset, p, MAX_NEW) for p in PROMPTS]
    engine = make_engine(tiny_checkpoint(preset), block_size=BS, num_blocks=512, prefix_caching=False)
    for _ in range(2):
        outs = engine.generate(PROMPTS, GREEDY)
        assert token_ids(outs) == ref
        assert all(o.num_cached_tokens == 0 for o in outs)
    assert engine.stats().prefix_cache_hit_tokens == 0
    assert engine.cached_block_hashes() == []
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_matches_hf_with_chunked_prefill(preset, tiny_checkpoint, hf_greedy, make_engine):
    ref = [hf_greedy(preset, p, MAX_NEW) for p in PROMPTS]
    engine = make_engine(tiny_checkpoint(preset), block_size=BS, num_blocks=512, max_num_batched_tokens=16)
    outs, first_step = run_steps(engine, PROMPTS, GREEDY)
    assert token_ids(outs) == ref
    # 16 tokens a step: the 64-token prompt needs at least 4 steps before its first token.
    assert first_step[4] >= 4
    # The last request was admitted after the one before it had computed (and cached) the shared prefix.
    assert engine.stats().prefix_cache_hit_tokens > 0
    assert outs[6].num_cached_tokens == len(COMMON)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_matches_hf_under_preemption(preset, tiny_checkpoint, hf_greedy, make_engine):
    ref = [hf_greedy(preset, p, MAX_NEW) for p in PROMPTS]
    # 29 usable blocks = 116 tokens: the longest request (88) fits, all of them together never do.
    engine = make_engine(tiny_checkpoint(preset), block_size=BS, num_blocks=30)
    outs = engine.generate(PROMPTS, GREEDY)
    assert token_ids(outs) == ref
    assert engine.stats().num_preemptions > 0
    assert_all_blocks_free(engine)


def test_greedy_matches_hf_under_preemption_without_prefix_caching(tiny_checkpoint, hf_greedy, make_engine):
    preset = "tiny-llama"
    ref = [hf_greedy(preset, p, MAX_NEW) for p in PROMPTS]
    engine = make_engine(tiny_checkpoint(preset), block_size=BS, num_blocks=30, prefix_caching=False,
                         max_num_batched_tokens=16)
    outs = engine.generate(PROMPTS, GREEDY)
    assert token_ids(outs) == ref
    assert engine.stats().num_preemptions > 0
    assert_all_blocks_free(engine)


def test_block_size_16_and_staggered_arrivals_match_hf(tiny_checkpoint, hf_greedy, make_engine):
    preset = "tiny-qwen3"
    engine = make_engine(tiny_checkpoint(preset), block_size=16, num_blocks=64)
    # Requests join while others are decoding (continuous batching).
    engine.add_request("a", PROMPTS[4], GREEDY)
    final = {}
    for step in range(200):
        if step == 3:
            engine.add_request("b", PROMPTS[2], GREEDY)
        if step == 7:
            engine.add_request("c", PROMPTS[5], GREEDY)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
        if len(final) == 3:
            break
    assert final == {
        "a": hf_greedy(preset, PROMPTS[4], MAX_NEW),
        "b": hf_greedy(preset, PROMPTS[2], MAX_NEW),
        "c": hf_greedy(preset, PROMPTS[5], MAX_NEW),
    }


# ----- bad requests ---------------------------------------------------------------------------


def _params(**bad):
    """Valid params with a bad value set afterwards (the constructor would refuse it)."""
    p = SamplingParams(max_tokens=4, temperature=0)
    for k, v in bad.items():
        setattr(p, k, v)
    return p


BAD_REQUESTS = {
    "prompt plus max_tokens too long": ([5] * 60, _params(max_tokens=5)),
    "prompt alone too long": ([5] * 65, _params(max_tokens=1)),
    "max_tokens 0": ([5, 6], _params(max_tokens=0)),
    "negative temperature": ([5, 6], _params(temperature=-1.0)),
    "nan top_p": ([5, 6], _params(top_p=math.nan)),
    "n 0": ([5, 6], _params(n=0)),
    "token id = vocab": ([5, 384], _params()),
    "negative token id": ([-1, 5], _params()),
    "float token id": ([5, 6.0], _params()),
    "empty prompt": ([], _params()),
    "text without tokenizer": ("hello", _params()),
}


@pytest.fixture
def small_ctx_engine(llama_ckpt, make_engine):
    return make_engine(llama_ckpt, block_size=BS, num_blocks=64, max_model_len=64)


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_refused_and_engine_keeps_serving(case, small_ctx_engine):
    engine = small_ctx_engine
    good = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = token_ids(engine.generate([PROMPTS[2]], good))
    free = engine.allocator.num_free_blocks
    prompt, params = BAD_REQUESTS[case]
    with pytest.raises(InvalidRequestError):
        engine.add_request("r", prompt, params)
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_waiting == 0 and engine.allocator.num_free_blocks == free
    # The refused id is not taken, and the next good request is served as before.
    engine.add_request("r", PROMPTS[2], good)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == "r" and outs[-1].outputs[0].token_ids == expected[0]


def test_prompt_that_exactly_fits_the_context_is_served(small_ctx_engine):
    out = small_ctx_engine.generate([[5] * 60], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_duplicate_request_id_is_refused_and_the_first_one_still_finishes(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, block_size=BS, num_blocks=64)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    engine.add_request("dup", PROMPTS[1], params)
    engine.step()
    with pytest.raises(InvalidRequestError, match="dup"):
        engine.add_request("dup", PROMPTS[3], params)
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert len(finals) == 1 and finals[0].prompt_token_ids == PROMPTS[1]
    assert finals[0].outputs[0].token_ids == token_ids(engine.generate([PROMPTS[1]], params))[0]
    # Once finished, the id may be used again.
    engine.add_request("dup", PROMPTS[3], params)
    assert engine.has_unfinished_requests()


def test_without_chunked_prefill_context_is_capped_by_the_token_budget(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, block_size=BS, num_blocks=64, max_num_batched_tokens=16,
                         enable_chunked_prefill=False)
    assert engine.max_model_len == 16  # a longer prompt could never be scheduled
    with pytest.raises(InvalidRequestError):
        engine.add_request("long", PROMPTS[2], SamplingParams(max_tokens=1))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    chunked = make_engine(llama_ckpt, block_size=BS, num_blocks=64, max_num_batched_tokens=16)
    prompts = [PROMPTS[1] * 2, PROMPTS[1]]
    assert token_ids(engine.generate(prompts, params)) == token_ids(chunked.generate(prompts, params))


# ----- abort ----------------------------------------------------------------------------------


def test_abort_frees_every_block(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, block_size=BS, num_blocks=64, max_num_seqs=2, max_num_batched_tokens=16)
    start = engine.allocator.num_free_blocks
    assert start == 63
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine.add_request("decoding", PROMPTS[1], params)  # 5 tokens: decoding after step 1
    engine.add_request("prefilling", PROMPTS[4], params)  # 64 tokens: still in chunked prefill
    engine.add_request("waiting", PROMPTS[3], params)  # max_num_seqs=2: never admitted
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_free_blocks < start
    seqs = {rid: state.seqs[0] for rid, state in engine.requests.items()}
    assert 0 < seqs["prefilling"].num_computed_tokens < 64

    out = engine.abort_request("prefilling")
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
    assert seqs["prefilling"].blocks == []
    out = engine.abort_request("waiting")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    engine.step()
    out = engine.abort_request("decoding")
    assert out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 4
    assert engine.abort_request("decoding") is None
    assert engine.abort_request("never-seen") is None
    assert engine.allocator.num_free_blocks == start
    assert_all_blocks_free(engine)
    assert engine.step() == []


def test_abort_of_one_completion_of_n_frees_all_and_others_are_unaffected(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, block_size=BS, num_blocks=64)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = token_ids(engine.generate([PROMPTS[2]], params))[0]
    engine.add_request("many", PROMPTS[3], SamplingParams(n=3, max_tokens=30, temperature=1.0, seed=1))
    engine.add_request("keep", PROMPTS[2], params)
    engine.step()
    engine.step()
    engine.abort_request("many")
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finals] == ["keep"] and finals[0].outputs[0].token_ids == expected
    assert_all_blocks_free(engine)


# ----- stopping ---------------------------------------------------------------------------------


def test_max_tokens_gives_length(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt)
    for n in (1, 7):
        out = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == n
        assert out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None


def test_stop_token_ids_stop_with_the_token_included(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt)
    full = token_ids(engine.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)))[0]
    for pick in (0, 5):
        stop = full[pick]
        cut = full.index(stop) + 1
        out = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[999, stop]))
        comp = out[0].outputs[0]
        assert comp.token_ids == full[:cut]
        assert comp.finish_reason == "stop" and comp.stop_reason == stop


def test_eos_stops_unless_ignored(llama_ckpt, copy_checkpoint, make_engine):
    base = make_engine(llama_ckpt)
    full = token_ids(base.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)))[0]
    eos = full[5]
    folder = copy_checkpoint(llama_ckpt, eos_token_id=eos)
    gen_cfg = folder / "generation_config.json"
    if gen_cfg.exists():
        cfg = json.loads(gen_cfg.read_text())
        cfg["eos_token_id"] = eos
        gen_cfg.write_text(json.dumps(cfg))
    engine = make_engine(folder)
    assert engine.eos_token_ids == {eos}
    comp = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0]
    assert comp.token_ids == full[: full.index(eos) + 1]
    assert comp.finish_reason == "stop" and comp.stop_reason is None
    comp = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0]
    assert comp.token_ids == full and comp.finish_reason == "length"


# ----- n, seeds, logprobs, streaming ------------------------------------------------------------


def test_greedy_n_gives_n_identical_completions(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt)
    one = token_ids(engine.generate([PROMPTS[2]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))[0]
    out = engine.generate([PROMPTS[2]], SamplingParams(n=3, max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [one] * 3
    assert all(c.finish_reason == "length" for c in out.outputs)
    assert engine.stats().prompt_tokens_total == 17 * 4
    assert engine.stats().generation_tokens_total == 8 * 4


SEEDED = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)


def test_seeded_n_completions_differ_but_are_reproducible(llama_ckpt, make_engine):
    first = [c.token_ids for c in make_engine(llama_ckpt).generate([PROMPTS[2]], SEEDED)[0].outputs]
    assert len(first) == 3 and len({tuple(t) for t in first}) == 3
    assert all(len(t) == 12 for t in first)
    # A fresh engine with another engine seed gives the same completions.
    again = make_engine(llama_ckpt, seed=1234).generate([PROMPTS[2]], SEEDED)[0].outputs
    assert [c.token_ids for c in again] == first
    other = make_engine(llama_ckpt).generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=1.0, seed=8))
    assert other[0].outputs[0].token_ids not in first[:1]


def test_seeded_request_does_not_depend_on_its_batch_mates(llama_ckpt, make_engine):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    alone = token_ids(make_engine(llama_ckpt).generate([PROMPTS[3]], params))[0]
    mates = [
        SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0),
        SamplingParams(max_tokens=9, temperature=0.5, top_k=5, seed=11, ignore_eos=True),
    ]
    prompts = [PROMPTS[4], PROMPTS[3], PROMPTS[0], PROMPTS[1]]
    batch = make_engine(llama_ckpt).generate(prompts, [mates[0], params, mates[1], mates[2]])
    assert batch[1].outputs[0].token_ids == alone
    # Chunked prefill and preemption change when and with whom it is sampled, not what.
    squeezed = make_engine(llama_ckpt, num_blocks=30, max_num_batched_tokens=16)
    batch = squeezed.generate(prompts + prompts, [mates[0], params, mates[1], mates[2]] * 2)
    assert squeezed.stats().num_preemptions > 0
    assert batch[1].outputs[0].token_ids == alone and batch[5].outputs[0].token_ids == alone


def test_logprobs_are_the_models_log_softmax(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    comp = engine.generate([PROMPTS[2]], params)[0].outputs[0]
    assert len(comp.logprobs) == 6
    seq = PROMPTS[2] + comp.token_ids
    logp = torch.log_softmax(forward_full_sequence(engine.model, seq)[len(PROMPTS[2]) - 1 : -1], dim=-1)
    for i, (token, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(logp[i, token].item(), abs=1e-4)
        assert list(lp.top) == logp[i].topk(3).indices.tolist()
        assert list(lp.top)[0] == token  # greedy picks the top one
    none = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0]
    assert none.logprobs is None


def test_streamed_deltas_add_up_to_the_final_output(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, max_num_batched_tokens=16)
    params = SamplingParams(n=2, max_tokens=10, temperature=0.8, seed=3, logprobs=1, ignore_eos=True)
    engine.add_request("s", PROMPTS[3], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    final = outs[-1]
    for i in range(2):
        assert sum((o.outputs[i].new_token_ids for o in outs), []) == final.outputs[i].token_ids
        assert sum((o.outputs[i].new_logprobs for o in outs), []) == final.outputs[i].logprobs
    m = final.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_only_finished_steps_report_each_request_once_with_everything(llama_ckpt, make_engine):
    """step(only_finished=True), as generate() runs it: no output until a request ends, then all of it."""
    engine = make_engine(llama_ckpt)
    want = engine.generate(PROMPTS[:3], GREEDY)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"f{i}", prompt, SamplingParams(max_tokens=MAX_NEW - 4 * i, temperature=0, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step(only_finished=True)
    assert all(o.finished for o in outs) and sorted(o.request_id for o in outs) == ["f0", "f1", "f2"]
    for o in outs:
        i = int(o.request_id[1:])
        assert o.outputs[0].token_ids == want[i].outputs[0].token_ids[: MAX_NEW - 4 * i]
        assert o.outputs[0].new_token_ids == o.outputs[0].token_ids  # nothing was reported before


# ----- text: tokenizer, detokenization, stop strings ---------------------------------------------


@pytest.fixture
def text_engine(text_ckpt, make_engine):
    return make_engine(text_ckpt)


TEXT_PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_text_prompt_and_text_output(text_engine):
    tok = text_engine.tokenizer
    assert tok is not None and len(tok) == text_engine.arch.vocab_size
    prompt = "Hello, world! The quick brown fox"
    out = text_engine.generate([prompt], TEXT_PARAMS)[0]
    assert out.prompt_token_ids == tok.encode(prompt, add_special_tokens=False)
    comp = out.outputs[0]
    assert comp.token_ids == token_ids(text_engine.generate([out.prompt_token_ids], TEXT_PARAMS))[0]
    assert comp.text == tok.decode(comp.token_ids, skip_special_tokens=True)
    assert len(comp.text) > 10


@pytest.mark.parametrize("start, length", [(3, 1), (6, 3), (11, 4), (15, 2)])
def test_stop_strings_truncate_text_end_to_end(text_engine, start, length):
    prompt = "def fibonacci(n):"
    full = text_engine.generate([prompt], TEXT_PARAMS)[0].outputs[0]
    stop = full.text[start : start + length]
    assert len(stop) == length
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["never-there", stop])
    text_engine.add_request("stop", prompt, params)
    outs = []
    while text_engine.has_unfinished_requests():
        outs += text_engine.step()
    comp = outs[-1].outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == full.text[: full.text.find(stop)]
    assert stop not in comp.text
    assert comp.token_ids == full.token_ids[: len(comp.token_ids)]
    assert len(comp.token_ids) < 24
    # The stream never showed a piece of the stop string.
    assert "".join(o.outputs[0].new_text for o in outs) == comp.text


def test_stream_of_text_without_stop_strings_adds_up(text_engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=5, ignore_eos=True, stop=["\x00\x01"])
    text_engine.add_request("t", "Blocks of the cache", params)
    outs = []
    while text_engine.has_unfinished_requests():
        outs += text_engine.step()
    comp = outs[-1].outputs[0]
    assert comp.finish_reason == "length"
    # Held-back text (a possible stop string start) is flushed when the sequence ends.
    assert "".join(o.outputs[0].new_text for o in outs) == comp.text
    assert comp.text == text_engine.tokenizer.decode(comp.token_ids, skip_special_tokens=True)


# ----- step counters --------------------------------------------------------------------------


def test_step_counters_tell_prompt_steps_and_sequences_per_step(llama_ckpt, make_engine):
    engine = make_engine(llama_ckpt, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request("a", list(range(3, 23)), params)  # 20 prompt tokens: chunks of 16 and 4
    steps = 0
    while engine.has_unfinished_requests():
        if steps == 3:  # joins while "a" decodes: one more prompt step beside a decode
            engine.add_request("b", [5, 6, 7, 8, 9, 10, 11, 12, 13], params)
        engine.step()
        steps += 1
    stats = engine.stats()
    # a: 2 prompt chunks (the second samples its first token), then 3 decodes, the second of them
    # beside b's prompt (b's first token); then b's 3 decodes alone. Sequences: 1, 1, 1, 2, 2, 1, 1.
    assert (stats.steps_total, stats.prompt_steps_total, stats.step_seqs_total) == (steps, 3, 9) == (7, 3, 9)
