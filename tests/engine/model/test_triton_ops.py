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


# ----- rope_and_cache: norm + rotary of q/k and the K/V cache write, one kernel ---------

BLOCK_SIZE = 4
NUM_BLOCKS = 7


def rope_case(h: int, kvh: int, d: int, t: int, dtype: torch.dtype, with_norm: bool, seed: int = 3) -> dict:
    """Strided q/k/v views of one fused qkv tensor, rotary tables, weights, positions."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(dtype)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    angles = torch.rand(64, d // 2, generator=gen) * 6
    return dict(
        q=q.view(t, h, d), k=k.view(t, kvh, d), v=v.view(t, kvh, d),
        cos_table=torch.cat([angles.cos(), angles.cos()], -1),
        sin_table=torch.cat([angles.sin(), angles.sin()], -1),
        positions=torch.randint(0, 64, (t,), generator=gen),
        q_weight=(torch.rand(d, generator=gen) + 0.5).to(dtype) if with_norm else None,
        k_weight=(torch.rand(d, generator=gen) + 0.5).to(dtype) if with_norm else None,
        eps=1e-6,
    )


def random_caches(kvh: int, d: int, dtype: torch.dtype, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    # Random, not zero, so that a stray write is visible whatever it writes.
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, kvh, d)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def reference_rope_and_cache(case: dict, k_cache, v_cache, slots) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused torch path: rmsnorm_ref + rotate_ref in fp32, then write_kv into copies of the caches."""
    from engine.attention.backend import write_kv

    q, k = case["q"].float(), case["k"].float()
    if case["q_weight"] is not None:
        q = rmsnorm_ref(q, case["q_weight"].float(), case["eps"])
        k = rmsnorm_ref(k, case["k_weight"].float(), case["eps"])
    cos, sin = case["cos_table"][case["positions"]], case["sin_table"][case["positions"]]
    q, k = rotate_ref(q, cos, sin), rotate_ref(k, cos, sin)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k.to(case["k"].dtype), case["v"], k_ref, v_ref, slots)
    return q, k_ref, v_ref


def run_fused(ops, case: dict, k_cache, v_cache, slots) -> torch.Tensor:
    return ops.rope_and_cache(**case, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)


def written_mask(slots: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size] True where some token's slot is."""
    mask = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    mask[slots[slots >= 0]] = True
    return mask.view(NUM_BLOCKS, BLOCK_SIZE)


# Scattered over non-neighbouring blocks, in no order, crossing block boundaries.
SLOTS = torch.tensor([5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 6 * 4 + 2, 1 * 4 + 0, 3 * 4 + 3])


@pytest.mark.parametrize(
    "h,kvh,d",
    [
        (4, 2, 16),  # GQA
        (4, 4, 32),  # MHA
        (6, 2, 16),  # q head count not a power of two (rows masked)
        (6, 3, 16),  # nor the KV head count: a stray row would land in the next slot
        (8, 1, 16),  # one KV head
    ],
)
@pytest.mark.parametrize("with_norm", [False, True], ids=["llama", "qwen3"])
def test_rope_and_cache_matches_unfused_path(ops, h, kvh, d, with_norm):
    case = rope_case(h, kvh, d, len(SLOTS), torch.float32, with_norm)
    k_cache, v_cache = random_caches(kvh, d, torch.float32)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q_ref, k_ref, v_ref = reference_rope_and_cache(case, k_cache, v_cache, SLOTS)

    q_out = run_fused(ops, case, k_cache, v_cache, SLOTS)

    assert q_out.shape == (len(SLOTS), h, d) and q_out.is_contiguous() and q_out.dtype == torch.float32
    assert rel_err(q_out, q_ref) < 1e-6
    # Whole caches: the written slots hold the new K/V, v bit for bit ...
    torch.testing.assert_close(k_cache, k_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache, v_ref)
    # ... and every other slot keeps its old contents exactly.
    untouched = ~written_mask(SLOTS)
    assert torch.equal(k_cache[untouched], before_k[untouched])
    assert torch.equal(v_cache[untouched], before_v[untouched])
    assert not torch.equal(k_cache, before_k)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [False, True], ids=["llama", "qwen3"])
def test_rope_and_cache_casts_to_the_cache_dtype(ops, cache_dtype, with_norm):
    case = rope_case(4, 2, 16, len(SLOTS), torch.float32, with_norm, seed=5)
    # v on the cache dtype's grid, so its store is exact under any rounding: the interpreter
    # truncates fp32 -> bf16 where the GPU rounds to nearest even.
    case["v"].copy_(case["v"].to(cache_dtype))
    k_cache, v_cache = random_caches(2, 16, cache_dtype, seed=6)
    before_k = k_cache.clone()
    q_ref, k_ref, v_ref = reference_rope_and_cache(case, k_cache, v_cache, SLOTS)

    q_out = run_fused(ops, case, k_cache, v_cache, SLOTS)

    assert q_out.dtype == torch.float32 and rel_err(q_out, q_ref) < 1e-6
    assert k_cache.dtype == cache_dtype
    # One rounding of (nearly) the same fp32 value: equal up to one unit in the last place
    # (bf16 is truncated under the interpreter, rounded in the reference).
    tol = 8e-3 if cache_dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(k_cache, k_ref, rtol=tol, atol=tol)
    assert torch.equal(v_cache, v_ref)
    untouched = ~written_mask(SLOTS)
    assert torch.equal(k_cache[untouched], before_k[untouched])


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float32])
def test_rope_and_cache_in_half_precision_matches_the_old_kernels(ops, cache_dtype):
    """fp16 model: the fused kernel rounds exactly as qk_norm_rope's kernel + write_kv did,
    k to the model dtype first even where the cache is wider."""
    from engine.attention.backend import write_kv

    case = rope_case(6, 2, 32, len(SLOTS), torch.float16, with_norm=True, seed=7)
    k_cache, v_cache = random_caches(2, 32, cache_dtype, seed=8)
    q_old, k_old = ops.qk_norm_rope(
        case["q"], case["k"], case["cos_table"], case["sin_table"], case["positions"],
        case["q_weight"], case["k_weight"], case["eps"],
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k_old, case["v"], k_ref, v_ref, SLOTS)

    q_out = run_fused(ops, case, k_cache, v_cache, SLOTS)

    assert torch.equal(q_out, q_old)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_rope_and_cache_padding_rows_only_touch_the_null_block(ops):
    """CUDA-graph padding: rows past the batch get slot 0 (block 0, never handed out), as write_kv had them."""
    real = torch.tensor([5 * 4 + 3, 2 * 4 + 1, 6 * 4 + 0])
    slots = torch.cat([real, torch.zeros(3, dtype=torch.int64)])
    case = rope_case(4, 2, 16, len(slots), torch.float32, with_norm=False, seed=9)
    k_cache, v_cache = random_caches(2, 16, torch.float32, seed=10)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q_ref, k_ref, v_ref = reference_rope_and_cache(case, k_cache, v_cache, slots)

    q_out = run_fused(ops, case, k_cache, v_cache, slots)

    assert rel_err(q_out, q_ref) < 1e-6
    # Which padding row lands last in slot 0 is unspecified for index_copy_ too; it is
    # garbage nobody reads. Everything outside block 0 must match, and slot 0 holds
    # some padding row's K/V.
    torch.testing.assert_close(k_cache[1:], k_ref[1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache[1:], v_ref[1:])
    assert torch.equal(k_cache[0, 1:], before_k[0, 1:]) and torch.equal(v_cache[0, 1:], before_v[0, 1:])
    assert any(torch.equal(v_cache[0, 0], case["v"][row]) for row in range(3, 6))


def test_rope_and_cache_skips_negative_slots(ops):
    slots = torch.tensor([2 * 4 + 1, -1, 3 * 4 + 0])
    case = rope_case(4, 2, 16, len(slots), torch.float32, with_norm=True, seed=11)
    k_cache, v_cache = random_caches(2, 16, torch.float32, seed=12)
    before_k, before_v = k_cache.clone(), v_cache.clone()

    run_fused(ops, case, k_cache, v_cache, slots)

    untouched = ~written_mask(slots)
    assert torch.equal(k_cache[untouched], before_k[untouched])
    assert torch.equal(v_cache[untouched], before_v[untouched])
    assert torch.equal(v_cache[2, 1], case["v"][0]) and torch.equal(v_cache[3, 0], case["v"][2])


def test_rope_and_cache_on_the_cpu_is_the_unfused_path():
    """The dispatch's CPU branch (what the model runs here) gives qk_norm_rope + write_kv."""
    from engine.model.fused_ops import rope_and_cache

    case = rope_case(4, 2, 16, len(SLOTS), torch.float32, with_norm=True, seed=13)
    k_cache, v_cache = random_caches(2, 16, torch.bfloat16, seed=14)
    q_ref, k_ref, v_ref = reference_rope_and_cache(case, k_cache, v_cache, SLOTS)
    q_out = rope_and_cache(**case, k_cache=k_cache, v_cache=v_cache, slot_mapping=SLOTS)
    assert rel_err(q_out, q_ref) < 1e-6
    torch.testing.assert_close(k_cache, k_ref, rtol=8e-3, atol=8e-3)
    assert torch.equal(v_cache, v_ref)
