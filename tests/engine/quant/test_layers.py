"""Each quantized linear layer against the float one it replaces (CPU reference path).

Tolerances are on the relative error of the outputs, ||y_q - y|| / ||y||,
for Gaussian weights and inputs. Round-to-nearest adds noise of about
step / sqrt(12) per weight, so the expected figures follow from the step:
  int8 per channel   step = max|w| / 127 (~3.3 sigma / 127)  -> ~0.75%   bound 1%
  int4 group 128     step = range / 15  (~5.3 sigma / 15)     -> ~10.1%   bound 11%
  int4 group 32      (a narrower range per group)             -> ~8.1%    bound 9%
  fp8 e4m3 (w and x) 3 mantissa bits, relative rounding        -> ~3.7%    bound 5%
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.quant.fp8 import Fp8Linear, quantize_fp8_rows
from engine.quant.int4 import Int4Linear, effective_group, pack_int4, quantize_int4_codes, unpack_int4
from engine.quant.int8 import Int8Embedding, Int8Linear
from engine.errors import ConfigError


def make_linear(k: int, n: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=0.02)
    if bias:
        nn.init.normal_(lin.bias, std=0.02)
    return lin.requires_grad_(False)


def rel_err(q: nn.Module, lin: nn.Linear, x: torch.Tensor) -> float:
    y = lin(x)
    return ((q(x) - y).norm() / y.norm()).item()


@pytest.mark.parametrize(
    "make, bound",
    [
        (lambda lin: Int8Linear.from_float(lin), 0.01),
        (lambda lin: Int4Linear.from_float(lin, 128), 0.11),
        (lambda lin: Int4Linear.from_float(lin, 32), 0.09),
        (lambda lin: Fp8Linear.from_float(lin), 0.05),
    ],
    ids=["int8", "int4-g128", "int4-g32", "fp8"],
)
def test_quantized_linear_is_close_to_the_float_one(make, bound):
    lin = make_linear(512, 256, bias=True)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    q = make(lin)
    assert q.in_features == 512 and q.out_features == 256
    assert rel_err(q, lin, x) < bound


def test_inputs_of_any_leading_shape_and_the_bias():
    lin = make_linear(128, 48, bias=True)
    q = Int8Linear.from_float(lin)
    x = torch.randn(2, 3, 128)
    assert q(x).shape == (2, 3, 48)
    torch.testing.assert_close(q(x)[1, 2], q(x[1, 2][None])[0])
    no_bias = Int8Linear(q.qweight, q.scales)
    torch.testing.assert_close(q(x) - no_bias(x), lin.bias.expand(2, 3, 48), atol=1e-6, rtol=0)


def test_quantized_tensors_are_buffers_of_the_packed_sizes():
    lin = make_linear(256, 64)
    q8, q4, f8 = Int8Linear.from_float(lin), Int4Linear.from_float(lin, 128), Fp8Linear.from_float(lin)
    assert list(q8.parameters()) == [] and list(q4.parameters()) == []
    assert q8.qweight.dtype == torch.int8 and q8.qweight.shape == (64, 256) and q8.scales.dtype == torch.float32
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (64, 128)
    assert q4.scales.shape == (64, 2) and q4.zeros.dtype == torch.uint8 and q4.group_size == 128
    assert f8.qweight.dtype == torch.float8_e4m3fn and f8.scales.shape == (64,)
    assert set(q4.state_dict()) == {"qweight", "scales", "zeros"}


def test_int4_packs_two_codes_per_byte_even_k_low():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[1 | 2 << 4, 15], [7 | 8 << 4, 9 | 10 << 4]]
    assert torch.equal(unpack_int4(packed), q)


def test_int4_codes_scales_and_zeros():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q, s, z = quantize_int4_codes(w, 16, torch.float32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert ((z >= 0) & (z <= 15) & (z == z.round())).all()
    # Every group's min and max map to (about) the ends of the 16 levels.
    wq = (q.float().view(8, 4, 16) - z[..., None]) * s[..., None]
    assert (wq - w.view(8, 4, 16)).abs().max() <= s.max() / 2 + 1e-6


def test_int4_is_exact_on_weights_already_on_its_grid():
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(16, 2, generator=gen) + 0.5
    z = torch.randint(0, 16, (16, 2), generator=gen).float()
    codes = torch.randint(0, 16, (16, 2, 32), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 15  # span the whole range, so the scale is found again
    w = ((codes - z[..., None]) * s[..., None]).reshape(16, 64)
    lin = nn.Linear(64, 16, bias=False).requires_grad_(False)
    lin.weight.copy_(w)
    torch.testing.assert_close(Int4Linear.from_float(lin, 32).dequantize(), w, atol=1e-5, rtol=1e-5)


def test_int4_group_size_follows_the_row():
    assert effective_group(384, 128) == 128
    assert effective_group(64, 128) == 64  # a row shorter than a group is one group
    with pytest.raises(ConfigError, match="multiple"):
        effective_group(192, 128)


def test_int8_embedding_rows():
    emb = nn.Embedding(100, 32).requires_grad_(False)
    q = Int8Embedding.from_float(emb)
    ids = torch.tensor([[3, 99, 0], [5, 5, 7]])
    out = q(ids)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float32
    ref = emb(ids)
    assert ((out - ref).norm() / ref.norm()).item() < 0.01
    torch.testing.assert_close(q.dequantize()[ids], out)


def test_fp8_rows_are_scaled_per_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -300.0]])
    xq, a = quantize_fp8_rows(x)
    torch.testing.assert_close(a[:, 0], torch.tensor([2.0 / 448, 300.0 / 448]))
    assert xq.float().abs().amax(dim=1).tolist() == [448.0, 448.0]


def test_bf16_layers_compute_in_bf16():
    lin = make_linear(256, 64).to(torch.bfloat16)
    x = torch.randn(4, 256).to(torch.bfloat16)
    for q in (Int8Linear.from_float(lin), Int4Linear.from_float(lin, 128)):
        y = q(x)
        assert y.dtype == torch.bfloat16
        assert ((y.float() - lin(x).float()).norm() / lin(x).float().norm()).item() < 0.11
    assert Int4Linear.from_float(lin, 128).scales.dtype == torch.bfloat16
