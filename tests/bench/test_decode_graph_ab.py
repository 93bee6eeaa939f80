"""bench/decode_graph_ab.py: every variant's switches name what the engine has (a renamed switch
fails here, on the CPU, rather than on the GPU machine)."""

from __future__ import annotations

import pytest

from bench import decode_graph_ab as ab
from engine.attention import triton_paged


@pytest.mark.parametrize("variant", ab.VARIANTS)
def test_each_variant_patches_attributes_the_engine_has(variant):
    for module, name, value in ab._patches(variant):
        assert hasattr(module, name), (variant, module.__name__, name)
        assert type(getattr(module, name)) is type(value) or callable(value), (variant, name)


def test_the_variant_tables_name_only_known_variants():
    for table in (ab.MMA_PREFETCH_GROUPS, ab.ATTENTION_SPLITS, ab.FOLDS, ab.PRELOADED):
        assert set(table) <= set(ab.VARIANTS)
    assert ab._patches("shipped") == [] and ab._patches("attn-late-reads")[0][2] is False


def test_preloaded_variants_switch_the_preload_on_with_their_tile():
    for variant, tile in ab.PRELOADED.items():
        assert ab._patches(variant)[1:] == [(triton_paged, "_DECODE_PRELOAD_BLOCK_N", tile)]
        assert ab._patches(variant)[0][1:] == ("_DECODE_PRELOAD", True)
    assert "_DECODE_PRELOAD" not in [name for _, name, _ in ab._patches("attn-1x256")]


def test_mma_no_split_tunes_only_configs_without_split_k():
    from engine.quant import int4_mma

    ((module, name, tuned),) = ab._patches("mma-no-split")
    assert module is int4_mma and name == "_int4_mma_tuned"
    splits = {config.kwargs["SPLIT_K"] for config in tuned.configs}
    assert splits == {1} and len(tuned.configs) == sum(c[2] == 1 for c in int4_mma._MMA_CONFIGS)


def test_chosen_variants_keep_the_table_order_and_always_the_shipped_graph():
    assert ab.chosen_variants(None) == list(ab.VARIANTS)
    assert ab.chosen_variants("attn-wide, attn-preload") == ["shipped", "attn-preload", "attn-wide"]
    with pytest.raises(SystemExit, match="attn-nope"):
        ab.chosen_variants("attn-nope")
