"""engine/model/norm_linear.py against the unfused path it replaces (norm, nn.Linear, SiLU-and-mul),
under the interpreter (bf16 dots through tests.triton_interpreter.exact_bf16_dot)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.triton_interpreter import exact_bf16_dot, interpreted_module  # noqa: E402

from engine.model.fused_ops import rmsnorm_ref  # noqa: E402

pytest.importorskip("triton")

BF16 = torch.bfloat16
EPS = 1e-5


@pytest.fixture
def kernel(monkeypatch):
    exact_bf16_dot(monkeypatch)
    return interpreted_module("engine.model.norm_linear", "_norm_linear_kernel")


def unfused(x, residual, norm_weight, weight, bias, gated):
    """What the layer computes without the kernel, each stage rounded to the model dtype as on the GPU."""
    dtype = x.dtype
    summed = x if residual is None else x + residual
    h = rmsnorm_ref(summed, norm_weight, EPS)
    out = (h.float() @ weight.float().T + (0 if bias is None else bias.float())).to(dtype)
    if gated:
        gate, up = out.chunk(2, dim=-1)
        out = (F.silu(gate.float()).to(dtype).float() * up.float()).to(dtype)
    return out, summed


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer_case(m: int, k: int, n: int, with_residual: bool, with_bias: bool, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    return dict(
        x=torch.randn(m, k, generator=gen).to(dtype),
        residual=(4 * torch.randn(m, k, generator=gen)).to(dtype) if with_residual else None,
        norm_weight=(torch.rand(k, generator=gen) + 0.5).to(dtype),
        weight=(torch.randn(n, k, generator=gen) / k**0.5).to(dtype),
        bias=torch.randn(n, generator=gen).to(dtype) if with_bias else None,
    )


CASES = [
    (1, 64, 64, False, False, False),  # the first layer of a batch-1 step: x is the residual
    (3, 96, 80, False, True, True),  # K and N off the 64-wide tiles; qkv with a bias (Qwen2)
    (20, 128, 2 * 72, True, True, False),  # two row blocks; gate_up of 72 outputs
    (64, 160, 2 * 64, True, True, False),  # the largest step it serves
    (16, 1024, 40, False, True, False),  # the widest rows it holds (eight warps)
]


@pytest.mark.parametrize("m, k, n, gated, with_residual, with_bias", CASES)
def test_norm_linear_matches_the_unfused_layer(kernel, m, k, n, gated, with_residual, with_bias):
    """fp32: every tile, mask, bias and the gate checked to rounding (the interpreter rounds fp32
    exactly; its bf16 casts truncate, see the next test)."""
    case = layer_case(m, k, n, with_residual, with_bias, torch.float32)
    out, summed = kernel.norm_linear(eps=EPS, gated=gated, **case)
    want, want_summed = unfused(gated=gated, **case)
    assert out.shape == want.shape
    assert torch.equal(summed, want_summed)  # the running residual
    assert summed is not case["residual"] and (case["residual"] is not None or summed is case["x"])
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("m, k, n, gated, with_residual, with_bias", CASES[1:3])
def test_norm_linear_in_bf16(kernel, m, k, n, gated, with_residual, with_bias):
    """The model's dtype: bf16 in, bf16 out; within the interpreter's truncating casts (a bf16 step each)."""
    case = layer_case(m, k, n, with_residual, with_bias, BF16)
    out, summed = kernel.norm_linear(eps=EPS, gated=gated, **case)
    want, want_summed = unfused(gated=gated, **case)
    assert out.dtype == summed.dtype == BF16
    assert rel_err(summed, want_summed) < 2**-7
    assert rel_err(out, want) < 3 * 2**-7


def test_rows_wider_than_it_holds_are_refused(kernel):
    case = layer_case(1, 1025, 16, False, False, torch.float32)
    with pytest.raises(ValueError, match="whole rows of up to 1024"):
        kernel.norm_linear(eps=EPS, gated=False, **case)


def test_the_dispatch_runs_the_unfused_path_where_the_kernel_does_not_fit():
    """On the CPU (and for quantized or large layers) `fused_ops.norm_linear` is norm, linear, act."""
    from torch import nn

    from engine.model.fused_ops import norm_linear
    from engine.model.llama import RMSNorm

    gen = torch.Generator().manual_seed(0)
    norm, linear = RMSNorm(32, EPS), nn.Linear(32, 2 * 24, bias=False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=gen) + 0.5)
        linear.weight.copy_(torch.randn(48, 32, generator=gen))
    x, residual = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen)
    out, summed = norm_linear(x, residual, norm, linear, True, fuse=True)
    h = rmsnorm_ref(x + residual, norm.weight, EPS)
    gate, up = F.linear(h, linear.weight).chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up)
    torch.testing.assert_close(summed, x + residual)


def test_the_engine_sets_the_flag_on_every_layer_of_both_models(llama_ckpt, make_engine, monkeypatch):
    """true: every layer of both models; false: none; auto: the draft's, and the target's only while
    its speculative graphs (verify pass, chain) are made, so plain decode graphs run unfused."""
    from engine import SpeculativeConfig
    from engine import engine as engine_module
    from engine import runner as runner_module

    seen: dict[str, list[bool]] = {}

    def recording(name, cls):
        class Recording(cls):
            def __init__(self, *args, **kwargs):
                model = args[0] if name == "verify" else args[1].model
                seen[name] = [layer.fuse_norm_linear for layer in model.layers]
                super().__init__(*args, **kwargs)

        return Recording

    monkeypatch.setattr(runner_module, "TargetVerifyPass", recording("verify", runner_module.TargetVerifyPass))
    monkeypatch.setattr(engine_module, "SpecChain", recording("chain", engine_module.SpecChain))
    spec = SpeculativeConfig(method="draft", draft_model=str(llama_ckpt), num_speculative_tokens=2)
    for mode, target, draft in ((False, False, False), (True, True, True), ("auto", False, True)):
        seen.clear()
        engine = make_engine(llama_ckpt, speculative=spec, fused_norm_linear=mode, async_scheduling=True)
        n, d = len(engine.model.layers), len(engine.proposer.draft.model.layers)
        assert [layer.fuse_norm_linear for layer in engine.model.layers] == [target] * n, mode
        assert [layer.fuse_norm_linear for layer in engine.proposer.draft.model.layers] == [draft] * d, mode
        assert seen == {"verify": [draft] * n, "chain": [draft] * n}, mode


def test_fused_norm_linear_context_restores_each_layer(llama_ckpt, make_engine):
    model = make_engine(llama_ckpt).model
    model.layers[0].fuse_norm_linear = True
    before = [layer.fuse_norm_linear for layer in model.layers]
    with pytest.raises(RuntimeError):
        with model.fused_norm_linear(False):
            assert not any(layer.fuse_norm_linear for layer in model.layers)
            raise RuntimeError
    assert [layer.fuse_norm_linear for layer in model.layers] == before


def test_a_model_with_the_fused_layers_equals_the_unfused_model(kernel, monkeypatch, llama_ckpt):
    """Every layer through the kernel (let onto the CPU here) gives the model's logits: the residual
    handed from layer to layer, the first layer's, gate_up's activation (tiny Llama, fp32)."""
    from engine.model import fused_ops
    from engine.model.dense import forward_full_sequence
    from engine.model.loader import load_model

    model = load_model(str(llama_ckpt), "float32", "cpu").model
    tokens = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    want = forward_full_sequence(model, tokens)
    calls = []
    monkeypatch.setattr(fused_ops, "_norm_linear_fits", lambda x, residual, linear: calls.append(x.shape) or True)
    for layer in model.layers:
        layer.fuse_norm_linear = True
    got = forward_full_sequence(model, tokens)
    assert len(calls) == 2 * len(model.layers)  # before attention and before the MLP, in every layer
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
