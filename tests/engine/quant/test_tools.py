"""The perplexity tool and bench/quant.py run end to end on the CPU (tiny sizes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.model.loader import load_model
from engine.quant.perplexity import main as ppl_main, perplexity, text_windows
from engine.tokenizer import load_tokenizer

TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789\n"
) * 8


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    return path


def test_perplexity_is_exp_of_the_mean_cross_entropy(text_ckpt):
    tok = load_tokenizer(text_ckpt)
    windows = text_windows(TEXT, tok, seq_len=32, num_windows=3)
    assert windows.shape == (3, 33)
    assert torch.equal(windows[1, 0], windows[0, 32])  # consecutive windows share their edge token
    model = load_model(str(text_ckpt), "float32", "cpu").model
    ppl = perplexity(model, windows)
    assert 1.0 < ppl < len(tok) * 10 and math.isfinite(ppl)
    assert perplexity(model, windows[:1]) != ppl


def test_perplexity_cli(text_ckpt, text_file, capsys):
    args = ["--model", str(text_ckpt), "--text", str(text_file), "--seq-len", "32", "--windows", "2", "--device", "cpu"]
    assert ppl_main(args + ["--method", "int4", "--group-size", "32", "--no-awq"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "int4" and out["awq"] is False and out["tokens"] == 64 and out["perplexity"] > 1
    assert ppl_main(args + ["--method", "fp8"]) == 2
    assert "compute capability" in capsys.readouterr().err


def test_bench_quant_smoke(text_ckpt, text_file, tmp_path):
    from bench import quant

    results = quant.main([
        "--preset", "tiny-llama", "--modes", "bf16,int8,int4,int4-triton,int4-torch,int4-triton-mma,fp8", "--prompt-len", "8",
        "--output-len", "4", "--repeats", "1", "--ppl-model", str(text_ckpt), "--ppl-text", str(text_file),
        "--ppl-windows", "2", "--ppl-seq-len", "32", "--json", str(tmp_path / "w3.json"),
    ])
    assert set(results["speed"]) == {"bf16", "int8", "int4", "int4-triton", "int4-torch", "int4-triton-mma"}
    assert {r["kernels"] for r in results["speed"].values()} == {"cpu reference"}
    assert "self_check" not in results  # CUDA only
    assert "compute capability" in results["skipped"]["fp8"]
    speed = results["speed"]
    assert all(r["tok_s"] > 0 and r["of_ceiling"] > 0 for r in speed.values())
    # The bytes a checkpoint holds: int8 about half of fp32's / 2 ... of the float model's.
    assert speed["int8"]["weight_bytes"] < 0.3 * speed["bf16"]["weight_bytes"]  # fp32 on the CPU
    assert speed["int4"]["weight_bytes"] < speed["int8"]["weight_bytes"]
    assert set(results["ppl"]) == {"none", "int8", "int4-rtn", "int4-awq"}
    assert json.loads((tmp_path / "w3.json").read_text())["preset"] == "tiny-llama"


def test_bench_quant_times_each_mode_with_and_without_async_scheduling():
    from bench import quant

    assert quant.speed_runs(["bf16", "int4"], "off") == ["bf16", "int4"]
    assert quant.speed_runs(["bf16", "int4"], "on") == ["bf16+async", "int4+async"]
    assert quant.speed_runs(["bf16", "int4"], "both") == ["bf16", "bf16+async", "int4", "int4+async"]
    results = quant.main([
        "--preset", "tiny-llama", "--modes", "bf16,int4-triton", "--async-scheduling", "both", "--prompt-len", "8",
        "--output-len", "4", "--repeats", "1", "--ppl-modes", "none", "--skip-kernel-check",
    ])
    speed = results["speed"]
    assert list(speed) == ["bf16", "bf16+async", "int4-triton", "int4-triton+async"]
    # Same greedy tokens whether the next step is launched before the last one's are read back.
    assert speed["bf16"]["first_tokens"] == speed["bf16+async"]["first_tokens"]
    assert speed["int4-triton"]["first_tokens"] == speed["int4-triton+async"]["first_tokens"]
