"""The "triton-mma" int4 kernel (engine/quant/int4_mma.py) and its repacking, on the CPU.

The kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before the module is
imported). Its tl.dot runs as numpy matmuls there: fp16 as it is, bf16 through
tests.triton_interpreter.exact_bf16_dot (numpy has no bf16). That checks the numbers, not the
register layouts or the speed (bench/quant.py's self-check and kernel check do, on a GPU).

Tolerance against the dequantized fp32 reference: one rounding of the output (the interpreter
truncates fp32 -> bf16, so a bf16 ulp, 2^-7 relative; fp16 rounds, 2^-11, bound 2^-10) plus fp32
summation error, bounded by `slack` of max |y|. The kernel sums x (OFFSET + q) and subtracts
(OFFSET + z) sum(x), so its fp32 error grows with OFFSET: 2e-5 for bf16 (128 + q), 1e-4 for fp16
(1024 + q). A wrong code moves y by about a step s |x|, a percent of max |y|: hundreds of times more.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.quant.int4 import Int4Linear, pack_int4  # noqa: E402
from tests.triton_interpreter import exact_bf16_dot, interpreted_module  # noqa: E402

triton = pytest.importorskip("triton")

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SLACK = {torch.bfloat16: 2e-5, torch.float16: 1e-4}


@pytest.fixture
def mma(monkeypatch):
    exact_bf16_dot(monkeypatch)
    return interpreted_module("engine.quant.int4_mma", "_int4_mma_kernel")


def layer(k: int, n: int, group: int, dtype: torch.dtype, bias: bool = True, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).requires_grad_(False)
    nn.init.normal_(lin.weight, std=0.05)
    if bias:
        nn.init.normal_(lin.bias, std=0.05)
    return Int4Linear.from_float(lin.to(dtype), group)


def excess(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max over elements of (error - bound) / bound: <= 0 passes."""
    bound = ULP[y.dtype] * ref.abs() + SLACK[y.dtype] * ref.abs().max()
    return float((((y.float() - ref).abs() - bound) / bound).max())


def check(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape
    assert excess(y, ref) <= 0, excess(y, ref)


def run(mma, q: Int4Linear, x: torch.Tensor, config: dict | None, ws=None) -> torch.Tensor:
    words = mma.pack_mma(q.qweight, q.group_size)
    return mma.int4_mma_matmul(x, words, q.scales, q.zeros, q.bias, q.group_size, ws, config)


# ----- the repacked layout ----------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_pack_puts_each_code_where_the_kernel_reads_it(mma, group):
    # Nibble p + 4h of word w of group g holds k = g * group + p * group/4 + 2w + h.
    gen = torch.Generator().manual_seed(group)
    n, k = 3, 2 * group
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    words = mma.pack_mma(pack_int4(q), group)
    assert words.dtype == torch.int32 and words.shape == (n, k // 8)
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [n, word, nibble]
    for g in range(k // group):
        for w in range(group // 8):
            for p in range(4):
                for h in range(2):
                    col = g * group + p * group // 4 + 2 * w + h
                    assert torch.equal(nibbles[:, g * group // 8 + w, p + 4 * h].to(torch.uint8), q[:, col])


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_unpack_inverts_pack(mma, group):
    gen = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (5, 3 * group // 2), generator=gen, dtype=torch.uint8)
    assert torch.equal(mma.unpack_mma(mma.pack_mma(packed, group), group), packed)


# ----- the kernel against the dequantized reference ---------------------------------------

# (K, N, group): K of 3 groups (a step of 4 or 8 is partial) and N not a multiple of BLOCK_N;
# group 32 (chunks of 16 groups), 64, and 256 (a step longer than a chunk: two weight loads).
SHAPES = [(384, 40, 128), (768, 72, 64), (256, 24, 32), (1024, 16, 256)]
CONFIGS = [
    {"BLOCK_N": 16, "STEP_GROUPS": 4},
    {"BLOCK_N": 32, "STEP_GROUPS": 8, "num_warps": 2},
    {"BLOCK_N": 16, "STEP_GROUPS": 16},
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}-N{s[1]}-g{s[2]}")
@pytest.mark.parametrize("bias", [False, True])
def test_one_row(mma, dtype, shape, bias):
    k, n, group = shape
    q = layer(k, n, group, dtype, bias)
    x = torch.randn(1, k).to(dtype)
    ref = q.forward_reference(x.float())
    for cfg in CONFIGS:
        check(run(mma, q, x, cfg), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 5, 20])
def test_several_rows(mma, dtype, m):
    # Columns hold several x rows (16 / STEP_GROUPS each program); 20 rows: two row blocks.
    q = layer(384, 40, 128, dtype)
    x = torch.randn(m, 384).to(dtype)
    ref = q.forward_reference(x.float())
    check(run(mma, q, x, None), ref)  # rows_config
    check(run(mma, q, x, {"BLOCK_N": 16, "STEP_GROUPS": 4}), ref)


def test_rows_config_fills_the_columns(mma):
    assert mma.rows_config(2, 128)["STEP_GROUPS"] == 8
    assert mma.rows_config(5, 128)["STEP_GROUPS"] == 2  # 8 rows a program
    assert mma.rows_config(40, 128)["STEP_GROUPS"] == 1
    assert mma.rows_config(40, 32)["STEP_GROUPS"] == 2  # a plane of one chunk spans >= 16 k


@pytest.mark.parametrize("split", [2, 3, 4, 8])
def test_split_k_is_deterministic_and_resets_its_counters(mma, split):
    # K = 768 is 6 groups: with steps of 2, a split of 4 leaves the last slice one step, 8 none.
    q = layer(768, 40, 128, torch.bfloat16)
    x = torch.randn(1, 768).to(torch.bfloat16)
    ws = mma.MmaWorkspace.for_rows(40, x.device)
    cfg = {"BLOCK_N": 16, "STEP_GROUPS": 2, "SPLIT_K": split}
    y = run(mma, q, x, cfg, ws)
    check(y, q.forward_reference(x.float()))
    assert not ws.counters.any()  # the last program of each row block reset its counter
    assert torch.equal(y, run(mma, q, x, cfg, ws))  # partials added in slice order: same bits


def test_every_tuned_config(mma):
    # Each config the autotuner may pick on the GPU (as the GPU runs it, batch 1, bf16), on a
    # layer with whole steps and row blocks (EVEN) for the big ones and a ragged one for all.
    ws_even, ws_odd = mma.MmaWorkspace.for_rows(128, "cpu"), mma.MmaWorkspace.for_rows(72, "cpu")
    even, odd = layer(2048, 128, 128, torch.bfloat16, bias=False), layer(1920, 72, 128, torch.bfloat16)
    x = torch.randn(1, 2048).to(torch.bfloat16)
    for c in mma._int4_mma_tuned.configs:
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        check(run(mma, even, x, cfg, ws_even), even.forward_reference(x.float()))
        check(run(mma, odd, x[:, :1920], cfg, ws_odd), odd.forward_reference(x[:, :1920].float()))


def test_the_check_catches_a_wrong_layout(mma):
    # The checkpoint's own bytes read as words (k in order, not the planes): must fail.
    q = layer(384, 40, 128, torch.bfloat16)
    x = torch.randn(1, 384).to(torch.bfloat16)
    wrong = q.qweight.view(torch.int32)
    y = mma.int4_mma_matmul(x, wrong, q.scales, q.zeros, q.bias, 128, None, CONFIGS[0])
    assert excess(y, q.forward_reference(x.float())) > 10


def test_rejects_what_it_cannot_run(mma):
    q = layer(256, 16, 64, torch.bfloat16)
    words = mma.pack_mma(q.qweight, 64)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        mma.int4_mma_matmul(torch.randn(1, 256), words, q.scales, q.zeros, None, 64)
    with pytest.raises(ValueError, match="group"):
        mma.int4_mma_matmul(torch.randn(1, 256).half(), words, q.scales, q.zeros, None, 16)
    with pytest.raises(ValueError, match="split"):
        mma.int4_mma_matmul(torch.randn(2, 256).half(), words, q.scales, q.zeros, None, 64, None,
                            {"BLOCK_N": 16, "STEP_GROUPS": 4, "SPLIT_K": 2})
    assert mma.int4_mma_matmul(torch.randn(0, 256).half(), words, q.scales, q.zeros, None, 64).shape == (0, 16)


def test_autotune_pruning(mma):
    cfgs = mma._int4_mma_tuned.configs
    assert len(cfgs) <= 12  # each is a compile at engine start
    kept = mma._prune(cfgs, {"K": 4096}, GROUP=128)  # 32 groups: every config fits
    assert kept == cfgs
    # K = 1024, 8 groups: a split must leave each slice a whole step.
    for c in mma._prune(cfgs, {"K": 1024}, GROUP=128):
        assert c.kwargs["SPLIT_K"] == 1 or c.kwargs["SPLIT_K"] * c.kwargs["STEP_GROUPS"] <= 8
    # group 32: a chunk's plane must span 16 k (tl.dot's smallest K), so steps of >= 2 groups.
    assert all(c.kwargs["STEP_GROUPS"] >= 2 for c in mma._prune(cfgs, {"K": 4096}, GROUP=32))
    assert max(c.kwargs["SPLIT_K"] for c in cfgs) == mma.MMA_MAX_SPLIT


# ----- the layer ----------------------------------------------------------------------------


def test_layer_repacking_keeps_the_weight(mma):
    q = layer(384, 40, 128, torch.bfloat16)
    before = q.dequantize()
    x = torch.randn(3, 384).to(torch.bfloat16)
    y = q(x)
    q.to_mma_(rows_per_chunk=16)  # three chunks of rows, the last partial
    assert q.mma and q.qweight is None and q.mma_qweight.shape == (40, 384 // 8)
    assert "mma_qweight" in q.state_dict() and "qweight" not in q.state_dict()
    assert torch.equal(q.dequantize(), before)
    assert torch.equal(q(x), y)  # the CPU runs the reference, which unpacks
    assert "mma" in q.extra_repr()
    with pytest.raises(RuntimeError, match="already"):
        q.to_mma_()
    assert not q.mma_supported()  # a CPU tensor (and no qweight any more)


# ----- RMSNorm folded into the products (one x row) ----------------------------------------

NORM_CONFIGS = [
    {"BLOCK_N": 64, "STEP_GROUPS": 4},  # whole sums
    {"BLOCK_N": 16, "STEP_GROUPS": 1, "SPLIT_K": 3},  # the split ending
]


@pytest.mark.parametrize("cfg", NORM_CONFIGS, ids=["whole", "split"])
def test_a_residual_adds_as_the_unfused_add_and_leaves_what_the_next_norm_needs(mma, cfg):
    # N = 80: a ragged last row block of 64, whose rows past N leave no sums.
    q = layer(384, 80, 128, torch.bfloat16, bias=True)
    x = torch.randn(1, 384).to(torch.bfloat16)
    residual = (4 * torch.randn(1, 80)).to(torch.bfloat16)
    norm_weight = (1 + torch.rand(80)).to(torch.bfloat16)
    ws = mma.MmaWorkspace.for_rows(80, "cpu")
    words = mma.pack_mma(q.qweight, 128)
    plain = mma.int4_mma_matmul(x, words, q.scales, q.zeros, q.bias, 128, None, cfg)
    summed, weighted = mma.int4_mma_matmul(
        x, words, q.scales, q.zeros, q.bias, 128, ws, cfg, residual=residual, norm_weight=norm_weight
    )
    # y rounded first, as the unfused add; then the sum (the interpreter truncates it: one ulp).
    torch.testing.assert_close(summed.float(), plain.float() + residual.float(), rtol=2**-7, atol=0)
    torch.testing.assert_close(weighted.float(), summed.float() * norm_weight.float(), rtol=2**-7, atol=0)
    squares = (summed.float() ** 2).reshape(5, 16).sum(1)
    assert ws.squares.shape == (5,)
    torch.testing.assert_close(ws.squares, squares, rtol=1e-6, atol=0)
    assert not ws.counters.any()


@pytest.mark.parametrize("cfg", NORM_CONFIGS, ids=["whole", "split"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_folded_norm_scales_the_product_by_the_rms_of_x(mma, cfg, bias):
    # x's sums of squares as the kernel ahead leaves them: 384 / 16 of them.
    q = layer(384, 40, 128, torch.bfloat16, bias=bias)
    x = (3 * torch.randn(1, 384)).to(torch.bfloat16)
    squares = (x.float() ** 2).reshape(24, 16).sum(1)
    eps = 1e-5
    y = mma.int4_mma_matmul(x, mma.pack_mma(q.qweight, 128), q.scales, q.zeros, q.bias, 128, None, cfg,
                            norm_squares=squares, eps=eps)
    rstd = torch.rsqrt((x.float() ** 2).mean() + eps)
    w = q.dequantize(torch.float32)
    ref = rstd * (x.float() @ w.T) + (0 if q.bias is None else q.bias.float())
    check(y, ref)


def test_norm_folding_rejects_what_it_cannot_fold(mma):
    q = layer(384, 40, 128, torch.bfloat16)
    words = mma.pack_mma(q.qweight, 128)
    x = torch.randn(2, 384).to(torch.bfloat16)
    nw = torch.ones(40, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one row of x"):
        mma.int4_mma_matmul(x, words, q.scales, q.zeros, None, 128, residual=torch.zeros(2, 40, dtype=torch.bfloat16), norm_weight=nw)
    with pytest.raises(ValueError, match=r"\[1, 40\]"):
        mma.int4_mma_matmul(x[:1], words, q.scales, q.zeros, None, 128, residual=torch.zeros(1, 40), norm_weight=nw)
    with pytest.raises(ValueError, match="only with it"):
        mma.int4_mma_matmul(x[:1], words, q.scales, q.zeros, None, 128, residual=torch.zeros(1, 40, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="sums of squares"):
        mma.int4_mma_matmul(x[:1], words, q.scales, q.zeros, None, 128, norm_squares=torch.zeros(3))
