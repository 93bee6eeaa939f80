"""N-gram prompt lookup: the longest matching tail, its latest earlier occurrence, never itself."""

from __future__ import annotations

import torch

from engine import SpeculativeConfig
from engine.spec.ngram import NgramProposer


def proposer(n_min=1, n_max=3, k=3) -> NgramProposer:
    return NgramProposer(SpeculativeConfig(method="ngram", num_speculative_tokens=k, ngram_min=n_min, ngram_max=n_max), torch.device("cpu"))


def test_longest_tail_wins_and_latest_occurrence():
    p = proposer()
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 2, 3, 8, 7, 1, 2, 3]
    # Tail [1, 2, 3] occurred at 0..2 (followed by 9, 2, 3); tail [2, 3] last at 4..5 (followed by 8):
    # the longest tail wins.
    assert p.lookup(0, tokens, 3) == [9, 2, 3]
    p2 = proposer()
    assert p2.lookup(0, [5, 2, 3, 8, 6, 2, 3, 7, 4, 2, 3], 2) == [7, 4]  # [2, 3]: the latest earlier occurrence


def test_no_match_and_no_self_match():
    p = proposer()
    assert p.lookup(0, [1, 2, 3, 4], 3) == []
    assert p.lookup(1, [7], 3) == []
    assert p.lookup(2, [7, 7], 3) == [7]  # [7] at 0 is followed by 7; the tail itself is not a match


def test_index_grows_with_the_sequence():
    p = proposer(n_min=2, n_max=2, k=2)
    tokens = [4, 5, 6]
    assert p.lookup(0, tokens, 2) == []
    tokens += [4, 5]
    assert p.lookup(0, tokens, 2) == [6, 4]
    tokens += [9, 4, 5]
    assert p.lookup(0, tokens, 2) == [9, 4]  # now the latest [4, 5] is at 3..4
    p.release([0])
    assert p._index == {}


def test_proposals_are_padded_rows():
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    from engine.spec.proposer import SpecRequest

    p = proposer(k=3)
    seqs = [Sequence(i, f"r{i}", 0, toks, SamplingParams(), 0.0) for i, toks in enumerate([[1, 2, 1], [3, 4], [5, 6, 7, 5, 6]])]
    out = p.propose([SpecRequest(s, 3) for s in seqs])
    assert out.num_tokens == [2, 0, 3]
    assert out.host_token_ids() == [[2, 1], [], [7, 5, 6]]  # what followed, up to the sequence's end
    assert out.token_ids.shape == (3, 3) and out.probs is None
