"""engine/greedy_argmax.py: the one-kernel argmax of a few rows, under the Triton interpreter."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.triton_interpreter import interpreted_module  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture
def ga():
    return interpreted_module("engine.greedy_argmax", "_argmax_kernel")


def test_argmax_with_its_ties_and_a_ragged_last_chunk(ga):
    vocab = 2 * ga.CHUNK + 904  # three chunks, the last partial
    argmax = ga.GreedyArgmax(vocab, torch.device("cpu"))
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1))
    logits[1, vocab - 1] = 100.0  # the maximum in the partial last chunk
    logits[2, [1500, 2047, ga.CHUNK + 7]] = 50.0  # ties within a chunk and across chunks: the first wins
    logits[3] = float("-inf")  # nothing finite: index 0, as torch
    tokens = argmax(logits)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert tokens[1:].tolist() == [vocab - 1, 1500, 0]
    assert not argmax._counters.any()  # each row's last program reset its counter
    # Again with the same buffers, rows strided (a view of wider logits) and in bf16.
    wide = torch.randn(2, vocab + 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert argmax(wide[:, :vocab]).tolist() == wide[:, :vocab].float().argmax(-1).tolist()


def test_it_takes_only_what_fits(ga):
    argmax = ga.GreedyArgmax(1000, torch.device("cpu"))
    assert argmax.fits(torch.zeros(ga.MAX_ROWS, 1000)) and not argmax.fits(torch.zeros(ga.MAX_ROWS + 1, 1000))
    assert not argmax.fits(torch.zeros(1, 999)) and not argmax.fits(torch.zeros(0, 1000))
    with pytest.raises(ValueError, match="1..8 rows of 1000"):
        argmax(torch.zeros(1, 999))
