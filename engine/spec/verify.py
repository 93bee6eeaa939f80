"""Checking proposals against the target: keep a prefix, add one token of the target's own.

The rule (Leviathan et al. 2023, Chen et al. 2023) keeps the output
distribution exactly the target's, whatever the proposer: accept proposal
x_i with probability min(1, p(x_i) / q(x_i)), where p is the target's
distribution and q the one x_i was drawn from; at the first rejection draw
the replacement from max(0, p - q), renormalized; if all are accepted, draw
a bonus token from p at the next position. Greedy rows are the case where
p is one-hot at the argmax: a proposal is kept iff it is the argmax, and
the next token is the argmax.

Every row of the batch is checked at once on the device; the only host copy
is the caller's read of the result.
"""

from __future__ import annotations

import torch

from engine.sampler import SamplingBatch, truncate_top_k_top_p
from engine.sequence import Sequence


def accept_or_resample(
    draft_ids: torch.Tensor,  # [B, k] proposed tokens (padding past num_drafts)
    num_drafts: torch.Tensor,  # [B] valid proposals per row
    target_probs: torch.Tensor,  # [B, k + 1, V] p at each proposal's position and one past the last
    draft_probs: torch.Tensor | None,  # [B, k, V] q; None: proposals are deterministic (q one-hot)
    uniform: torch.Tensor,  # [B, k] U[0, 1) for the accept tests
    race: torch.Tensor,  # [B, V] Exp(1) noise for the one token drawn per row
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, k + 1], num_accepted [B]); row b emits tokens[b, : num_accepted[b] + 1].

    Gathers only, no indexing by tensors: the chained steps capture this in a CUDA graph."""
    b, k = draft_ids.shape
    vocab = target_probs.shape[2]
    cols = torch.arange(k, device=draft_ids.device)
    p = target_probs[:, :k].gather(2, draft_ids.unsqueeze(2)).squeeze(2)
    q = torch.ones_like(p) if draft_probs is None else draft_probs.gather(2, draft_ids.unsqueeze(2)).squeeze(2)
    # Accept x_i with probability min(1, p/q): u < p/q, written u*q < p so q = 0 needs no care.
    accepted = (uniform * q < p) & (cols < num_drafts.unsqueeze(1))
    # Only the unbroken run of acceptances from the first proposal counts.
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
    # One more token from the first position not accepted: from max(0, p - q) after a rejection,
    # from p itself when there is no proposal there (all accepted: the bonus token).
    p_next = target_probs.gather(1, num_accepted.view(b, 1, 1).expand(b, 1, vocab)).squeeze(1)
    rejected = num_accepted < num_drafts
    at = num_accepted.clamp(max=k - 1).unsqueeze(1)
    if draft_probs is None:
        q_next = torch.zeros_like(p_next).scatter_(1, draft_ids.gather(1, at), 1.0)
    else:
        q_next = draft_probs.gather(1, at.view(b, 1, 1).expand(b, 1, vocab)).squeeze(1)
    residual = torch.where(rejected.unsqueeze(1), (p_next - q_next).clamp(min=0.0), p_next)
    # All-zero residual means p == q there, where a rejection cannot happen (only rounding can): use p.
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_next)
    # argmax(w / E) with E ~ Exp(1) draws index i with probability w_i / sum(w): no normalizing needed.
    next_token = (residual / race).argmax(dim=1, keepdim=True)
    tokens = torch.cat([draft_ids, draft_ids[:, :1]], dim=1).scatter_(1, num_accepted.unsqueeze(1), next_token)
    return tokens, num_accepted


def target_probs(
    logits: torch.Tensor,  # [B, k + 1, V]
    temperatures: torch.Tensor,  # [B] fp32
    top_ks: torch.Tensor | None = None,  # [B] int64, the vocabulary size where off; None: no row truncates
    top_ps: torch.Tensor | None = None,  # [B] fp32; None: no row has a top-p
    any_greedy: bool = True,  # False: no row at T = 0 (no one-hot rows to make)
) -> torch.Tensor:
    """p [B, k + 1, V] from the target's logits: softmax(logits / T) per row, cut to its top-k and
    top-p as its sampler would cut it; one-hot at the argmax where T = 0. No host syncs."""
    b, k1, vocab = logits.shape
    scaled = logits / temperatures.clamp_min(1e-5).view(b, 1, 1)
    if top_ks is not None:
        per_position = None if top_ps is None else top_ps.repeat_interleave(k1)
        scaled = truncate_top_k_top_p(scaled.view(b * k1, vocab), top_ks.repeat_interleave(k1), per_position)
        scaled = scaled.view(b, k1, vocab)
    probs = torch.softmax(scaled, dim=2)
    if not any_greedy:
        return probs
    one_hot = torch.zeros_like(probs).scatter_(2, logits.argmax(dim=2, keepdim=True), 1.0)
    return torch.where((temperatures == 0.0).view(b, 1, 1), one_hot, probs)


def draw_accept_noise(
    uniform: torch.Tensor, race: torch.Tensor, generator: torch.Generator, seqs: list[Sequence]
) -> None:
    """Fills the accept tests' U[0, 1) [B, k] and the drawn token's Exp(1) [B, V] of rows seqs, in place:
    from the engine's generator, except that a seeded request draws only from its own."""
    uniform.uniform_(generator=generator)
    race.exponential_(generator=generator)
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            uniform[row].uniform_(generator=seq.generator)
            race[row].exponential_(generator=seq.generator)


def accept_greedy(
    draft_ids: torch.Tensor, num_drafts: torch.Tensor, target_argmax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """accept_or_resample when p is one-hot at target_argmax [B, k + 1]: no probabilities, no noise."""
    k = draft_ids.shape[1]
    cols = torch.arange(k, device=draft_ids.device)
    accepted = (draft_ids == target_argmax[:, :k]) & (cols < num_drafts.unsqueeze(1))
    # Accepted proposals equal the argmax, and the next token is the argmax: the row is the argmax.
    return target_argmax, accepted.long().cumprod(dim=1).sum(dim=1)


def verify(
    logits: torch.Tensor,  # [B, k + 1, V] target logits at the last known token and each proposal
    draft_ids: torch.Tensor,  # [B, k]
    num_drafts: list[int],
    draft_probs: torch.Tensor | None,  # [B, k, V] or None
    seqs: list[Sequence],
    generator: torch.Generator,  # the engine's: for rows whose request has no seed
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target distributions from each row's sampling params, then the accept/resample rule."""
    b, k1, vocab = logits.shape
    dev = logits.device
    n_drafts = torch.tensor(num_drafts, dtype=torch.int64).to(dev, non_blocking=True)
    params = [s.params for s in seqs]
    if all(p.temperature == 0.0 for p in params):
        return accept_greedy(draft_ids, n_drafts, logits.argmax(dim=2))
    # Each row's distribution at every position, as its sampler would shape it (temperature, top-k, top-p).
    batch = SamplingBatch.from_seqs(seqs, vocab, dev)
    cut = batch.any_top_k or batch.any_top_p
    probs = target_probs(
        logits, batch.temperatures, batch.top_ks if cut else None, batch.top_ps if batch.any_top_p else None,
        any_greedy=any(p.temperature == 0.0 for p in params),
    )
    uniform = torch.empty(b, k1 - 1, device=dev)
    race = torch.empty(b, vocab, device=dev)
    draw_accept_noise(uniform, race, generator, seqs)
    return accept_or_resample(draft_ids, n_drafts, probs, draft_probs, uniform, race)
