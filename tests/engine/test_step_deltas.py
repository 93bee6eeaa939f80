"""LLMEngine.step_deltas (what the engine core sends) says exactly what step()'s outputs add, step by step."""

import pytest

from engine import SamplingParams

PROMPTS = [[5, 9, 14, 3, 7, 11, 2, 8, 30, 31, 32], [40, 41], [7] * 23]
PARAMS = [
    SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
    SamplingParams(n=2, max_tokens=7, temperature=0.8, seed=3, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, stop=["a"], ignore_eos=True),
]


def delta_of(out) -> tuple:
    """A RequestOutput reduced to its new parts, as the engine core's pipe carried it before step_deltas."""
    choices = [(c.index, c.new_token_ids, c.new_text, c.finish_reason, c.stop_reason, c.new_logprobs) for c in out.outputs]
    return out.request_id, out.finished, out.num_cached_tokens, out.metrics if out.finished else None, choices


def run(engine, use_deltas: bool) -> list[list[tuple]]:
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
        engine.add_request(f"r{i}", prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        got = engine.step_deltas() if use_deltas else [delta_of(o) for o in engine.step()]
        # Timestamps differ between the two runs; everything else must not.
        steps.append([(*d[:3], d[3] is not None, d[4]) for d in got])
        assert len(steps) < 200
    return steps


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_deltas_equal_the_outputs_new_parts(text_ckpt, make_engine, async_scheduling):
    make = lambda: make_engine(text_ckpt, max_num_batched_tokens=16, async_scheduling=async_scheduling)  # noqa: E731
    expected, got = run(make(), use_deltas=False), run(make(), use_deltas=True)
    assert got == expected
    assert any(choice[2] for step in got for d in step for choice in d[4])  # some text was sent
    assert any(choice[5] for step in got for d in step for choice in d[4])  # and some logprobs
    # every request finished once, and every generated token was sent exactly once
    finished = [d[0] for step in got for d in step if d[1]]
    assert sorted(finished) == ["r0", "r1", "r2"]
