"""Sampler: greedy, temperature, top-k / top-p truncation, per-request seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler, SamplingBatch, truncate_top_k_top_p
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

CPU = torch.device("cpu")


def seqs_for(params: list[SamplingParams], seeds: list[int | None] | None = None) -> list[Sequence]:
    seeds = seeds or [None] * len(params)
    out = []
    for i, (p, seed) in enumerate(zip(params, seeds)):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out.append(Sequence(i, f"r{i}", 0, [1], p, 0.0, gen))
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], seed: int = 0, seqs=None):
    seqs = seqs or seqs_for(params)
    batch = SamplingBatch.from_seqs(seqs, logits.shape[-1], CPU)
    return Sampler(CPU, seed)(logits, batch)


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent samples of one distribution, as one batch of n identical rows."""
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    return torch.tensor(sample(logits, [params] * n, seed).token_ids)


def test_greedy_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [SamplingParams(temperature=0)] * 8)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_rows_stay_argmax_in_a_sampled_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5)] * 3
    for seed in range(5):
        tokens = sample(logits, params, seed).token_ids
        assert tokens[0::2] == logits[0::2].argmax(-1).tolist()


def test_top_k_one_equals_greedy():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 16, seed=3)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_sampling_follows_the_softmax_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    got = torch.bincount(draws(probs.log(), SamplingParams(temperature=1.0), n), minlength=4).float() / n
    assert torch.allclose(got, probs, atol=0.02), got
    # Temperature 0.5 squares the probabilities (then renormalises).
    sharp = probs**2 / (probs**2).sum()
    got = torch.bincount(draws(probs.log(), SamplingParams(temperature=0.5), n, seed=1), minlength=4).float() / n
    assert torch.allclose(got, sharp, atol=0.02), got


def test_top_k_never_picks_outside_the_k_most_likely():
    logits = torch.tensor([0.0, 3.0, 0.5, 2.9, 2.8, 0.1, 1.0, 0.2, 0.3, 0.4])
    tokens = draws(logits, SamplingParams(temperature=1.0, top_k=3), 3000)
    assert set(tokens.tolist()) == {1, 3, 4}  # only these, and each of them
    # Without top_k the others carry real mass: the check above could fail.
    assert not set(draws(logits, SamplingParams(temperature=1.0), 3000).tolist()) <= {1, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])  # sorted: 1 (0.4), 3 (0.3), 2 (0.2), 0 (0.1)
    tokens = draws(probs.log(), SamplingParams(temperature=1.0, top_p=0.6), 4000)
    assert set(tokens.tolist()) == {1, 3}  # mass before token 2 is 0.7 >= 0.6
    share = (tokens == 1).float().mean().item()
    assert share == pytest.approx(0.4 / 0.7, abs=0.03)  # renormalised over the kept set
    tokens = draws(probs.log(), SamplingParams(temperature=1.0, top_p=0.3), 500)
    assert set(tokens.tolist()) == {1}  # the first token always stays
    tokens = draws(probs.log(), SamplingParams(temperature=1.0, top_p=0.75), 4000)
    assert set(tokens.tolist()) == {1, 3, 2}


def test_top_k_and_top_p_together_and_per_row():
    probs = torch.tensor([0.05, 0.4, 0.2, 0.3, 0.05])
    both = draws(probs.log(), SamplingParams(temperature=1.0, top_k=2, top_p=0.95), 3000)
    assert set(both.tolist()) == {1, 3}
    # Rows of one batch keep their own limits.
    n = 1000
    logits = probs.log().unsqueeze(0).repeat(2 * n, 1)
    params = [SamplingParams(temperature=1.0, top_k=1)] * n + [SamplingParams(temperature=1.0, top_p=0.65)] * n
    tokens = torch.tensor(sample(logits, params).token_ids)
    assert set(tokens[:n].tolist()) == {1}
    assert set(tokens[n:].tolist()) == {1, 3}


def test_top_p_one_keeps_everything_beside_a_row_that_cuts():
    """The first token's probability rounds to 1 in fp32, so the mass before the second one
    reaches 1: a row at top_p 1 keeps it all the same, whatever shares its batch."""
    logits = torch.tensor([[0.0, -30.0], [0.0, -30.0]])
    cut = truncate_top_k_top_p(logits, torch.tensor([2, 2]), torch.tensor([1.0, 0.5]))
    assert torch.isfinite(cut[0]).all()
    assert cut[1].tolist() == [0.0, float("-inf")]


def test_a_seeded_row_does_not_depend_on_its_batch_mates():
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(4, 64, generator=gen) for _ in range(12)]
    target = SamplingParams(temperature=1.0, seed=42)

    def run(row: int, batch_size: int, mate_seeds, sampler_seed: int) -> list[int]:
        params = [SamplingParams(temperature=0.8, top_p=0.9)] * batch_size
        params[row] = target
        seeds = list(mate_seeds)
        seeds[row] = 42
        seqs = seqs_for(params, seeds)
        sampler = Sampler(CPU, sampler_seed)
        out = []
        for logits in steps:
            rows = logits[:batch_size].clone()
            rows[row] = logits[0]  # the target always sees the same logits
            batch = SamplingBatch.from_seqs(seqs, 64, CPU)
            out.append(sampler(rows, batch).token_ids[row])
        return out

    alone = run(0, 1, [None], sampler_seed=0)
    assert run(2, 4, [None, 7, None, 9], sampler_seed=123) == alone
    assert run(1, 3, [1, None, None], sampler_seed=9) == alone
    assert len(set(alone)) > 3  # it really samples
    # Another seed gives another stream.
    params = [SamplingParams(temperature=1.0, seed=43)]
    seqs = seqs_for(params, [43])
    sampler = Sampler(CPU, 0)
    other = [sampler(s[:1].clone(), SamplingBatch.from_seqs(seqs, 64, CPU)).token_ids[0] for s in steps]
    assert other != alone


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(6)) * 3
    params = [
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=0.7, logprobs=0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, top_k=4, logprobs=2),
    ]
    out = sample(logits, params, seed=1)
    logp = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for row in (0, 1, 3):
        lp = out.logprobs[row]
        token = out.token_ids[row]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(logp[row, token].item(), abs=1e-5)
        k = params[row].logprobs
        vals, ids = logp[row].topk(k)
        assert list(lp.top) == ids.tolist()  # best first
        assert list(lp.top.values()) == pytest.approx(vals.tolist(), abs=1e-5)
    assert out.logprobs[1].top == {}
    assert out.logprobs[0].logprob == pytest.approx(logp[0].max().item(), abs=1e-5)
    assert all(math.isfinite(lp.logprob) for lp in out.logprobs if lp is not None)
