"""bench/speculative.py runs (CPU, tiny sizes) and reports every figure of W4."""

from __future__ import annotations

import json


def test_speculative_bench_smoke(tmp_path, capsys):
    from bench.speculative import main

    out = tmp_path / "w4.json"
    results = main(
        [
            "--device", "cpu", "--dtype", "float32", "--output-len", "6", "--prompt-tokens", "20",
            "--batch-sizes", "1,2", "--batch1-prompts", "1", "--temperatures", "0,0.8", "--runs", "1",
            "--variants", "none,draft:2,ngram:2,draft:2+unfused", "--json", str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "W4: " in printed and "x at batch 1 temp 0" in printed
    saved = json.loads(out.read_text())
    for variant in ("none", "draft:2", "ngram:2", "draft:2+unfused"):
        for key in ("b1_t0", "b2_t0", "b1_t0.8", "b2_t0.8"):
            row = saved["variants"][variant][key]
            assert row["tokens"] == 6 * (1 if key.startswith("b1") else 2) and row["tok_s"] > 0
    assert saved["variants"]["draft:2"]["b1_t0"]["exact_match"] == 1.0  # fp32: the same tokens as without
    assert saved["variants"]["draft:2"]["b2_t0"]["tokens_per_step"] >= 1.0
    assert results["variants"]["none"]["b1_t0"]["acceptance_rate"] is None
    # The fused layers are CUDA's: on the CPU the same tokens.
    assert results["variants"]["draft:2+unfused"]["b1_t0"]["output"] == results["variants"]["draft:2"]["b1_t0"]["output"]


def test_speculative_bench_profiles_one_batch_1_step_per_variant(tmp_path):
    from bench.speculative import main

    results = main(
        [
            "--device", "cpu", "--dtype", "float32", "--output-len", "4", "--prompt-tokens", "16",
            "--batch-sizes", "1", "--batch1-prompts", "1", "--temperatures", "0", "--runs", "1",
            "--variants", "draft:2", "--profile", "--profile-steps", "3",
        ]
    )
    profile = results["variants"]["draft:2"]["profile_b1"]
    assert profile["batch"] == 1 and profile["wall_ms_per_step"] > 0
    names = [h["name"] for h in profile["host_top"]]
    # The verify pass and the draft's proposals are among the costliest host functions of a step.
    assert any("execute_spec" in n for n in names) and any("propose" in n for n in names)


def test_speculative_bench_interleaves_the_runs_of_all_variants(capsys):
    """--interleave: every engine first, then per cell run 1 of each variant, run 2 of each, ..."""
    from bench.speculative import main

    results = main(
        [
            "--device", "cpu", "--dtype", "float32", "--output-len", "4", "--prompt-tokens", "16",
            "--batch-sizes", "1", "--batch1-prompts", "1", "--temperatures", "0", "--runs", "2",
            "--variants", "none,draft:2", "--interleave",
        ]
    )
    for variant in ("none", "draft:2"):
        cell = results["variants"][variant]["b1_t0"]
        assert len(cell["tok_s_runs"]) == 2 and cell["tokens"] == 4 and "init_s" in results["variants"][variant]
    assert results["variants"]["draft:2"]["b1_t0"]["exact_match"] == 1.0
    printed = capsys.readouterr().out
    assert "W4: " in printed


def test_variant_suffixes_pick_the_fusion_mode():
    from bench.speculative import split_fusion

    assert split_fusion("draft:2+unfused") == ("draft:2", {"fused_norm_linear": False})
    assert split_fusion("none-sync+fused") == ("none-sync", {"fused_norm_linear": True})
    assert split_fusion("remote:2") == ("remote:2", {})  # the engine's default
