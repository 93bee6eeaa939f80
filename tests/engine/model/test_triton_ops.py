"""The fused Triton ops of the forward pass against their torch references, under the interpreter."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.triton_interpreter import interpreted_module  # noqa: E402

from engine.model.fused_ops import rmsnorm_ref, rotate_ref  # noqa: E402

pytest.importorskip("triton")


@pytest.fixture
def ops():
    return interpreted_module("engine.model.triton_ops", "_add_rmsnorm_kernel")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [64, 100])
def test_add_rmsnorm_matches_torch(ops, with_residual, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=gen)
    res = torch.randn(7, n, generator=gen) if with_residual else None
    w = torch.rand(n, generator=gen) + 0.5
    out, new_res = ops.add_rmsnorm(x, res, w, 1e-6)
    summed = x if res is None else x + res
    assert rel_err(new_res, summed) == 0.0
    assert rel_err(out, rmsnorm_ref(summed, w, 1e-6)) < 1e-6


@pytest.mark.parametrize("with_norm", [False, True])
def test_qk_norm_rope_matches_torch_on_strided_views(ops, with_norm):
    gen = torch.Generator().manual_seed(1)
    t, h, kvh, d = 5, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen)
    q, k, _ = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k = q.view(t, h, d), k.view(t, kvh, d)  # strided views, as in the model
    angles = torch.rand(64, d // 2, generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    pos = torch.tensor([0, 9, 3, 63, 17])
    qw = torch.rand(d, generator=gen) + 0.5 if with_norm else None
    kw = torch.rand(d, generator=gen) + 0.5 if with_norm else None
    q_out, k_out = ops.qk_norm_rope(q, k, cos, sin, pos, qw, kw, 1e-6)
    q_ref, k_ref = (rmsnorm_ref(q, qw, 1e-6), rmsnorm_ref(k, kw, 1e-6)) if with_norm else (q, k)
    assert rel_err(q_out, rotate_ref(q_ref, cos[pos], sin[pos])) < 1e-6
    assert rel_err(k_out, rotate_ref(k_ref, cos[pos], sin[pos])) < 1e-6
    assert q_out.is_contiguous() and k_out.is_contiguous()


def test_silu_and_mul_matches_torch(ops):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2 * 1500, generator=gen)  # spans two column blocks, the second partial
    gate, up = x.chunk(2, dim=-1)
    assert rel_err(ops.silu_and_mul(x), torch.nn.functional.silu(gate) * up) < 1e-6
