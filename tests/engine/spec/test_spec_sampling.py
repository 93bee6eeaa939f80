"""At temperature > 0 the engine with a draft samples exactly the target's distribution.

A target and a different draft with a vocabulary of 8 tokens; 4000 samples
of three tokens after one prompt, through the whole engine path (draft
proposals, the verify pass, rejection sampling, the bonus token, the plain
sampler for the last token), against the exact joint distribution of the
target computed with dense forward passes. Pearson's chi-square, by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine import SamplingParams, SpeculativeConfig
from engine.model.dense import forward_full_sequence

from spec_stats import chi2, chi2_critical

PROMPT = [3, 5, 1, 6, 4, 7]


def target_probs(model, tokens: list[int], temperature: float, top_k: int) -> torch.Tensor:
    logits = forward_full_sequence(model, tokens)[-1] / temperature
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("temperature,top_k", [(0.9, 0), (1.0, 4)])
def test_sampled_sequences_follow_the_target(temperature, top_k, vocab8_pair, make_engine):
    target, draft = vocab8_pair
    engine = make_engine(
        target, block_size=4,
        speculative=SpeculativeConfig(method="draft", draft_model=str(draft), num_speculative_tokens=2),
    )
    n = 4000
    params = SamplingParams(n=n, max_tokens=3, temperature=temperature, top_k=top_k, ignore_eos=True)
    out = engine.generate([PROMPT], params)[0]
    counts = torch.zeros(8, 8, 8)
    for comp in out.outputs:
        counts[tuple(comp.token_ids)] += 1
    joint = torch.zeros(8, 8, 8)
    p1 = target_probs(engine.model, PROMPT, temperature, top_k)
    for t1, t2 in itertools.product(range(8), range(8)):
        if p1[t1] == 0:
            continue
        p2 = target_probs(engine.model, PROMPT + [t1], temperature, top_k)
        joint[t1, t2] = p1[t1] * p2[t2] * target_probs(engine.model, PROMPT + [t1, t2], temperature, top_k)
    stats = engine.stats()
    # The draft is not the target: a fair share of proposals is rejected, a fair share kept.
    assert 0.2 < stats.spec_acceptance_rate < 0.9, stats
    stat, dof = chi2(counts.flatten(), joint.flatten())
    assert stat < chi2_critical(dof), (stat, dof)
    # Power: the draft's own distribution of the first token is far from the target's.
    draft_engine = make_engine(draft, block_size=4)
    q1 = target_probs(draft_engine.model, PROMPT, temperature, 0)
    stat_q, dof_q = chi2(counts.sum((1, 2)), q1)
    assert stat_q > chi2_critical(dof_q)
