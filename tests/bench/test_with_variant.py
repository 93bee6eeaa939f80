"""bench/with_variant.py: bench.quant's real CPU run (tiny sizes) with a variant's switches on for
the whole run and back after it; its JSON names the variant and the command."""

from __future__ import annotations

import json

from bench import quant, with_variant
from engine.attention import triton_paged


def test_bench_quant_runs_with_the_variants_switches_and_its_json_names_the_variant(monkeypatch, tmp_path):
    seen = []
    real_run_speed = quant.run_speed

    def run_speed(*args, **kwargs):  # the real speed run, noting the switch it ran under
        seen.append(triton_paged._DECODE_PRELOAD)
        return real_run_speed(*args, **kwargs)

    monkeypatch.setattr(quant, "run_speed", run_speed)
    out = tmp_path / "w3.json"
    argv = ["attn-preload", "bench.quant", "--preset", "tiny-llama", "--modes", "bf16", "--prompt-len", "8",
            "--output-len", "4", "--repeats", "1", "--ppl-modes", "none", "--skip-kernel-check", "--json", str(out)]
    result = with_variant.main(argv)
    assert seen == [True] and triton_paged._DECODE_PRELOAD is False  # on for the run, then as shipped
    written = json.loads(out.read_text())
    assert written["variant"] == "attn-preload" and len(written["speed"]["bf16"]["first_tokens"]) == 4
    assert written["command"] == "python -m bench.with_variant " + " ".join(argv) and result["variant"] == "attn-preload"
