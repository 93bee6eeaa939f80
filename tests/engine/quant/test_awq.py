"""Activation-aware int4 scales: better than round-to-nearest where activations have outlier
channels, and folded into the previous operations without changing the float model."""

from __future__ import annotations

import pytest
import torch

from engine.model.dense import forward_full_sequence
from engine.model.loader import load_model
from engine.quant.awq import apply_awq_, search_clip, search_scale
from engine.quant.calibration import calibration_sequences, capture_linear_inputs
from engine.quant.int4 import fake_quantize_int4
from engine.quant.swap import untie_lm_head_
from engine.tokenizer import load_tokenizer


def outlier_activations(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose few channels are 20x larger than the rest, as in real LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[: k // 32]] *= 20.0
    return x


def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return (x @ (wq - w).t()).pow(2).mean().item()


def test_awq_scales_beat_round_to_nearest_on_outlier_channels():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(128, 512, generator=gen) * 0.02
    x = outlier_activations(1024, 512)
    s, alpha, rtn_err, awq_err = search_scale(w, x, 128, torch.float32)
    assert alpha > 0 and awq_err < 0.8 * rtn_err
    # The figures it reports are the real ones.
    assert rtn_err == pytest.approx(output_error(w, fake_quantize_int4(w, 128), x[::2]), rel=1e-3)
    assert awq_err == pytest.approx(output_error(w, fake_quantize_int4(w * s, 128) / s, x[::2]), rel=1e-3)
    # Outlier channels get the larger scales.
    big = x.abs().mean(0) > 5
    assert s[big].min() > s[~big].max()


def test_clipping_never_raises_a_groups_error():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=gen) * 0.02
    w[0, 3] = 0.5  # one stray weight stretches its group's range
    x = torch.randn(512, 256, generator=gen)
    max_val = search_clip(w, x, 64, torch.float32)
    orig = w.abs().view(64, 4, 64).amax(-1)
    assert (max_val <= orig + 1e-7).all() and (max_val >= 0.5 * orig - 1e-7).all()
    assert max_val[0, 0] < orig[0, 0]  # the stretched group is clipped
    m = max_val.repeat_interleave(64, dim=1)
    clipped = torch.maximum(torch.minimum(w, m), -m)
    assert output_error(w, fake_quantize_int4(clipped, 64), x) < output_error(w, fake_quantize_int4(w, 64), x)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_folding_the_scales_keeps_the_float_model(tiny_checkpoint, preset):
    """Without clipping, AWQ only moves scale between operations: same logits (GQA, bias, qk-norm, tied)."""
    model = load_model(str(tiny_checkpoint(preset)), "float32", "cpu").model
    untie_lm_head_(model)
    calib = calibration_sequences(None, model.arch.vocab_size, num_tokens=96, seq_len=48)
    ids = calib[0]
    before = forward_full_sequence(model, ids)
    results = apply_awq_(model, capture_linear_inputs(model, calib), group=32, clip=False)
    assert len(results) == 4 * model.arch.num_layers + 1
    assert all(r.awq_error <= r.rtn_error for r in results)
    assert any(r.alpha > 0 for r in results)  # something actually moved
    torch.testing.assert_close(forward_full_sequence(model, ids), before, atol=1e-4, rtol=1e-4)


def test_calibration_text_and_random_fallback(text_ckpt):
    tok = load_tokenizer(text_ckpt)
    seqs = calibration_sequences(tok, len(tok), num_tokens=300, seq_len=128)
    assert [len(s) for s in seqs] == [128, 128, 44]
    assert seqs == calibration_sequences(tok, len(tok), num_tokens=300, seq_len=128)  # deterministic
    assert tok.decode(seqs[0][:64]).strip()  # real text, not noise
    rand = calibration_sequences(None, 50, num_tokens=64, seq_len=64)
    assert len(rand) == 1 and max(rand[0]) < 50 and rand == calibration_sequences(None, 50, num_tokens=64, seq_len=64)
