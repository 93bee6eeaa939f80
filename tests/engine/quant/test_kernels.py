"""The Triton quantized-matmul kernels against the layers' torch reference, on the CPU.

The kernels run under the Triton interpreter (TRITON_INTERPRET=1, read when a
kernel is decorated, so it is set before engine.quant.kernels is imported).
That checks the numbers, not the speed (bench/quant.py times them on a GPU).
Tile sizes are pinned per test (the autotuner needs a GPU): several shapes,
masks on every edge, both kernels (one row: matvec; more: tl.dot).

fp8: the interpreter's float -> e4m3 conversion rounds some values wrongly
(a mantissa carry into the exponent, e.g. 125.2 -> 64), so activations here
are chosen to be exact e4m3 values times a power of two, with a row maximum
of 448 times it: the per-token quantization is then exact and the kernel
must agree with the reference to fp32 rounding. The GPU check in
bench/quant.py covers the rounding itself.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.triton_interpreter import interpreted_module  # noqa: E402
from torch import nn  # noqa: E402

from engine.quant.fp8 import Fp8Linear  # noqa: E402
from engine.quant.int4 import Int4Linear  # noqa: E402
from engine.quant.int8 import Int8Linear  # noqa: E402

triton = pytest.importorskip("triton")


@pytest.fixture
def kernels():
    return interpreted_module("engine.quant.kernels", "_matvec_kernel")


def linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).requires_grad_(False)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def run(kernels, q, x, config):
    fmt = {Int8Linear: kernels.FMT_INT8, Int4Linear: kernels.FMT_INT4, Fp8Linear: kernels.FMT_FP8}[type(q)]
    extra = {"zeros": q.zeros, "group": q.group_size} if isinstance(q, Int4Linear) else {}
    return kernels.quant_matmul(x, fmt, q.qweight, q.scales, bias=q.bias, config=config, **extra)


def check(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


MATVEC = [{"BLOCK_N": 16, "BLOCK_K": 128}, {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 2}]
MATMUL = [{"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_M": 16}, {"BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_M": 32}]


@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cfg", [0, 1])
def test_int8(kernels, m, bias, cfg):
    lin = linear(320, 40, bias)  # K not a multiple of BLOCK_K, N not of BLOCK_N
    q = Int8Linear.from_float(lin)
    x = torch.randn(m, 320)
    config = MATVEC[cfg] if m == 1 else MATMUL[cfg]
    check(run(kernels, q, x, config), q.forward_reference(x))


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4(kernels, m, group):
    lin = linear(384, 24, bias=m == 3)  # 384 = 3 groups of 128: the matvec's last step is partial
    q = Int4Linear.from_float(lin, group)
    x = torch.randn(m, 384)
    config = {"BLOCK_N": 16, "BLOCK_K": 256} if m == 1 else {"BLOCK_N": 16, "BLOCK_K": 0}
    check(run(kernels, q, x, config), q.forward_reference(x))


def test_int4_fp16_tensor_core_path(kernels):
    # The dot path in half precision (bf16 needs a GPU: numpy has no bf16).
    lin = linear(256, 64, bias=True)
    q = Int4Linear.from_float(lin, 64)
    q.scales = q.scales.half()
    q.bias = q.bias.half()
    x = torch.randn(7, 256).half()
    y = run(kernels, q, x, {"BLOCK_N": 32, "BLOCK_K": 0})
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), q.forward_reference(x.float()), atol=2e-2, rtol=2e-2)


def exact_fp8_rows(m: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vals = (torch.randn(m, k, generator=gen) * 60).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    vals[:, 0] = 448.0  # the row maximum: the per-token scale is then exactly 2^e
    return vals * (2.0 ** torch.arange(-3, m - 3)).float()[:, None]


@pytest.mark.parametrize("m", [1, 4])
def test_fp8_weights_and_per_token_activations(kernels, m):
    lin = linear(256, 40, bias=True)
    q = Fp8Linear.from_float(lin)
    x = exact_fp8_rows(m, 256)
    config = {"BLOCK_N": 16, "BLOCK_K": 64} if m == 1 else {"BLOCK_N": 16, "BLOCK_K": 64, "BLOCK_M": 16}
    check(run(kernels, q, x, config), q.forward_reference(x))


def test_empty_batch(kernels):
    q = Int8Linear.from_float(linear(64, 16, False))
    assert run(kernels, q, torch.randn(0, 64), MATMUL[0]).shape == (0, 16)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_bf16_matvec(kernels, cls):
    # One row in bf16, as a decode step on the GPU runs it (the matvec has no tl.dot, so the
    # interpreter can run it in bf16).
    lin = linear(256, 40, bias=True).to(torch.bfloat16)
    q = cls.from_float(lin) if cls is Int8Linear else cls.from_float(lin, 64)
    x = torch.randn(1, 256).to(torch.bfloat16)
    y = run(kernels, q, x, {"BLOCK_N": 16, "BLOCK_K": 128})
    assert y.dtype == torch.bfloat16
    ref = q.forward_reference(x.float())
    torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)


def test_rows_that_are_not_whole_words_take_the_matmul_kernel(kernels):
    q = Int8Linear.from_float(linear(66, 24, True))  # 66 int8 codes: not whole int32 words
    x = torch.randn(1, 66)
    check(run(kernels, q, x, {"BLOCK_N": 16, "BLOCK_K": 32}), q.forward_reference(x))


def test_autotune_pruning(kernels):
    cfgs = kernels._int4_matvec_tuned.configs
    kept = kernels._prune_int4_matvec(cfgs, {"K": 4096}, GROUP=512)  # 8 groups
    assert kept and all(c.kwargs["BLOCK_K"] % 512 == 0 for c in kept)
    fallback = kernels._prune_int4_matvec(cfgs, {"K": 4096}, GROUP=4096)
    assert [c.kwargs for c in fallback] == [{"BLOCK_N": 32, "BLOCK_K": 4096, "SPLIT_K": 1}]
    # K = 512, group 128: 4 groups, 2 per step: a split of 2 fits, 4 would leave splits empty.
    splits = {c.kwargs["SPLIT_K"] for c in kernels._prune_int4_matvec(cfgs, {"K": 512}, GROUP=128)}
    assert splits == {1, 2}
    assert max(c.kwargs["SPLIT_K"] for c in cfgs) == kernels.INT4_MAX_SPLIT
    mm = kernels._matmul_tuned.configs
    int4 = kernels._prune_matmul(mm, {}, FMT=kernels.FMT_INT4)
    assert len({(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in int4}) == len(int4)


# ----- int4 matvec: split-K and the bf16 fast path ------------------------------------------
# Tolerance: the kernel sums in fp32 and rounds once to the output dtype, so against the
# dequantized fp32 reference it is within one output ulp (2^-7 relative for bf16: the
# interpreter truncates fp32 -> bf16 where the GPU rounds to nearest; 2^-23 for fp32) plus
# fp32 summation error, bounded here by 1e-5 of the largest |y|.


def check_int4(y, ref):
    ulp = 2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-23
    err = (y.float() - ref).abs()
    bound = ulp * ref.abs() + 1e-5 * ref.abs().max()
    assert y.dtype in (torch.bfloat16, torch.float32) and bool((err <= bound).all()), float((err - bound).max())


def int4_layer(k: int, n: int, group: int, dtype: torch.dtype, bias: bool = True) -> Int4Linear:
    return Int4Linear.from_float(linear(k, n, bias).to(dtype), group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_int4_matvec_split_k(kernels, dtype, split):
    # K = 768: 6 groups of 128, 2 per step; split 4 leaves the last split one partial step.
    # N = 40: the last row block is partial.
    q = int4_layer(768, 40, 128, dtype)
    x = torch.randn(1, 768).to(dtype)
    ws = kernels.Int4Workspace.for_rows(40, x.device)
    cfg = {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": split}
    y = kernels.quant_matmul(x, kernels.FMT_INT4, q.qweight, q.scales, q.zeros, q.bias, 128, cfg, ws)
    check_int4(y, q.forward_reference(x.float()))
    assert not ws.counters.any()  # the last program of each block reset its counter
    again = kernels.quant_matmul(x, kernels.FMT_INT4, q.qweight, q.scales, q.zeros, q.bias, 128, cfg, ws)
    assert torch.equal(y, again)  # partials are added in split order: same bits every call


def test_int4_matvec_every_tuned_config(kernels):
    # Each config the autotuner may pick on the GPU, on a bf16 layer with a split of up to 8.
    q = int4_layer(2048, 72, 128, torch.bfloat16, bias=False)
    x = torch.randn(1, 2048).to(torch.bfloat16)
    ref = q.forward_reference(x.float())
    ws = kernels.Int4Workspace.for_rows(72, x.device)
    for c in kernels._int4_matvec_tuned.configs:
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        y = kernels.quant_matmul(x, kernels.FMT_INT4, q.qweight, q.scales, q.zeros, None, 128, cfg, ws)
        check_int4(y, ref)


def test_int4_matvec_group_32_and_unaligned_rows(kernels):
    # bf16 x at an odd element offset is not 8-byte aligned: the kernel reads it one value at a time.
    q = int4_layer(256, 24, 32, torch.bfloat16)
    x = torch.randn(1, 257).to(torch.bfloat16)[:, 1:]
    assert x.data_ptr() % 8
    y = kernels.quant_matmul(x, kernels.FMT_INT4, q.qweight, q.scales, q.zeros, q.bias, 32,
                             {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2})
    check_int4(y, q.forward_reference(x.float()))


def test_int4_matvec_config_must_fit_the_workspace(kernels):
    q = int4_layer(256, 16, 64, torch.float32)
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="workspace"):
        kernels.quant_matmul(x, kernels.FMT_INT4, q.qweight, q.scales, q.zeros, None, 64,
                             {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": kernels.INT4_MAX_SPLIT * 2})
