"""bench/kept.py: W2's kept ratio from interleaved passes."""

from __future__ import annotations

import pytest

from bench.kept import kept_ratio, paired_ratios


def test_each_serve_pass_is_held_against_the_direct_passes_around_it():
    # A host that slows down steadily: Serve keeps 90% of what direct does at the same moment.
    direct = [100.0, 80.0, 60.0]
    serve = [0.9 * 90.0, 0.9 * 70.0]
    assert paired_ratios(direct, serve) == pytest.approx([0.9, 0.9])
    kept = kept_ratio(direct, serve)
    assert kept.paired_mean == pytest.approx(0.9)
    assert kept.low == pytest.approx(0.9) and kept.high == pytest.approx(0.9)
    assert kept.of_means == pytest.approx((81.0 + 63.0) / 2 / 80.0)


def test_the_interval_spans_the_rounds_spread():
    # W2 at 64 streams, 8 rounds on an H200 (BENCHMARKS.md): rounds kept 0.70 to 0.93.
    direct = [29021, 34060, 38884, 39899, 29543, 28218, 36568, 34513, 36377]
    serve = [23060, 34078, 28730, 25719, 24412, 28386, 24911, 31230]
    kept = kept_ratio(direct, serve)
    ratios = paired_ratios(direct, serve)
    assert min(ratios) < kept.low < kept.paired_mean < kept.high < max(ratios)
    assert kept.high < 0.9  # under the target whatever the spread
    assert kept_ratio(direct, serve) == kept  # seeded: the same report twice


def test_passes_that_are_not_interleaved_are_refused():
    with pytest.raises(ValueError, match="one direct pass more"):
        paired_ratios([1.0, 2.0], [1.0, 2.0])
