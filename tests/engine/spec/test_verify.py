"""The accept/resample rule on crafted distributions, and its statistics.

Chi-square statistics are computed by hand (no scipy) against critical
values at p = 0.001 from the Wilson-Hilferty approximation; seeds are
fixed, so each test is deterministic. Each statistical test also checks
that it can tell a wrong answer (the draft's own distribution) apart.
"""

from __future__ import annotations

import pytest
import torch

from engine.spec.verify import accept_greedy, accept_or_resample
from spec_stats import chi2, chi2_critical

V = 8


def test_critical_values():
    assert chi2_critical(7) == pytest.approx(24.32, abs=0.5)  # the approximation is a little high at low dof
    assert chi2_critical(63) == pytest.approx(103.4, abs=0.5)


def test_greedy_rule_on_crafted_rows():
    argmax = torch.tensor([[5, 6, 7, 1], [5, 6, 7, 1], [5, 6, 7, 1], [5, 6, 7, 1]])
    drafts = torch.tensor([[5, 6, 7], [5, 0, 7], [4, 6, 7], [5, 6, 7]])
    num = torch.tensor([3, 3, 3, 1])
    tokens, accepted = accept_greedy(drafts, num, argmax)
    assert accepted.tolist() == [3, 1, 0, 1]  # all / up to the mismatch / none / capped by num_drafts
    assert tokens.tolist() == argmax.tolist()


def test_one_hot_target_makes_the_general_rule_greedy():
    gen = torch.Generator().manual_seed(0)
    b, k = 64, 3
    logits = torch.randn(b, k + 1, V, generator=gen)
    argmax = logits.argmax(2)
    drafts = torch.where(torch.rand(b, k, generator=gen) < 0.6, argmax[:, :k], torch.randint(0, V, (b, k), generator=gen))
    num = torch.randint(0, k + 1, (b,), generator=gen)
    one_hot = torch.zeros(b, k + 1, V).scatter_(2, argmax.unsqueeze(2), 1.0)
    want = accept_greedy(drafts, num, argmax)
    for draft_probs in (None, torch.softmax(torch.randn(b, k, V, generator=gen), 2)):
        uniform = torch.rand(b, k, generator=gen)
        race = torch.empty(b, V).exponential_(generator=gen)
        tokens, accepted = accept_or_resample(drafts, num, one_hot, draft_probs, uniform, race)
        assert accepted.tolist() == want[1].tolist()
        for row, m in enumerate(accepted.tolist()):
            assert tokens[row, : m + 1].tolist() == want[0][row, : m + 1].tolist()


def test_equal_distributions_accept_everything():
    gen = torch.Generator().manual_seed(1)
    b, k = 256, 4
    p = torch.softmax(torch.randn(b, k + 1, V, generator=gen), 2)
    drafts = torch.multinomial(p[:, :k].reshape(-1, V), 1, generator=gen).view(b, k)
    tokens, accepted = accept_or_resample(
        drafts, torch.full((b,), k), p, p[:, :k].clone(), torch.rand(b, k, generator=gen), torch.ones(b, V)
    )
    assert accepted.tolist() == [k] * b
    assert tokens[:, :k].tolist() == drafts.tolist()


def test_impossible_proposals_are_always_rejected():
    b, k = 32, 2
    p = torch.zeros(b, k + 1, V)
    p[:, :, :4] = 0.25  # the target never picks 4..7
    drafts = torch.full((b, k), 6)
    tokens, accepted = accept_or_resample(
        drafts, torch.full((b,), k), p, None, torch.zeros(b, k), torch.empty(b, V).exponential_()
    )
    assert accepted.tolist() == [0] * b
    assert all(t < 4 for t in tokens[:, 0].tolist())


def _setup(seed: int, b: int, k: int):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(2.0 * torch.randn(k + 1, V, generator=gen), 1)  # the target, per position
    q = torch.softmax(2.0 * torch.randn(k, V, generator=gen), 1)  # a draft that differs from it
    drafts = torch.stack([torch.multinomial(q[j], b, replacement=True, generator=gen) for j in range(k)], 1)
    uniform = torch.rand(b, k, generator=gen)
    race = torch.empty(b, V).exponential_(generator=gen)
    return p, q, drafts, uniform, race


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_emitted_tokens_follow_the_target_distribution(deterministic_draft):
    """20k rows at once: at every position an emitted token is distributed as the target's p there."""
    b, k = 20000, 3
    p, q, drafts, uniform, race = _setup(0, b, k)
    if deterministic_draft:  # e.g. n-gram lookup: always the same guess, q one-hot
        drafts = p[:k].argmax(1).expand(b, k).contiguous()
        draft_probs = None
    else:
        draft_probs = q.expand(b, k, V)
    tokens, accepted = accept_or_resample(drafts, torch.full((b,), k), p.expand(b, k + 1, V), draft_probs, uniform, race)
    assert 0 < accepted.float().mean().item() < k  # both acceptances and rejections happen
    for j in range(k + 1):
        emitted = accepted >= j  # row emits a token at position j iff the first j were accepted
        assert emitted.sum() > 1000
        counts = torch.bincount(tokens[emitted, j], minlength=V)
        stat, dof = chi2(counts, p[j])
        assert stat < chi2_critical(dof), (j, stat, counts.tolist(), (p[j] * emitted.sum()).tolist())
    if not deterministic_draft:  # the test has power: the proposals themselves are not distributed as p
        stat, dof = chi2(torch.bincount(drafts[:, 0], minlength=V), p[0])
        assert stat > 10 * chi2_critical(dof)


def test_fewer_proposals_than_k():
    b, k = 20000, 3
    p, q, drafts, uniform, race = _setup(1, b, k)
    num = torch.randint(0, k + 1, (b,), generator=torch.Generator().manual_seed(2))
    tokens, accepted = accept_or_resample(drafts, num, p.expand(b, k + 1, V), q.expand(b, k, V), uniform, race)
    assert (accepted <= num).all()
    for j in range(k):  # (few rows reach the bonus position here)
        emitted = accepted >= j
        assert emitted.sum() > 1000
        stat, dof = chi2(torch.bincount(tokens[emitted, j], minlength=V), p[j])
        assert stat < chi2_critical(dof)
