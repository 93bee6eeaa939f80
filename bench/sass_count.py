"""SASS instructions per weight in the main loop of the two int4 decode kernels, without a GPU.

    python -m bench.sass_count            # every tuned config of both kernels, group 128, bf16

Each config is compiled for sm_90 by this Triton (ptxas from its wheel) as the autotuner would
launch it on the 8B model's layers (bf16, group 128, pointers and sizes divisible by 16, whole
blocks), disassembled with the wheel's cuobjdump, and the instructions of its longest loop are
divided by the weights one thread handles per iteration. At batch 1 a kernel that issues n
instructions per weight needs n * 9e9 issue slots per token: a bound on speed, not a timing
(that is bench/quant.py's kernel check, on a GPU). Also the registers and spill stack of the decode
attention kernel as the 8B model's batch-1 step launches it (decode_attention_usage).
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DIVISIBLE = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "part_ptr", "count_ptr", "magic_ptr",
              "N", "K", "stride_xm", "stride_wn", "stride_sn", "stride_ym")


# The tensor-core int4 kernel's arguments as a bf16 model launches it (engine/quant/int4_mma.py).
MMA_SIGNATURE = {
    "x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "b_ptr": "*bf16", "y_ptr": "*bf16",
    "part_ptr": "*fp32", "count_ptr": "*i32", "magic_ptr": "*i32", "res_ptr": "*bf16", "nw_ptr": "*bf16",
    "t_ptr": "*bf16", "sq_out_ptr": "*fp32", "sq_in_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
    "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_ym": "i32", "eps": "fp32",
}


@dataclass(frozen=True)
class LoopCount:
    label: str
    registers: int
    shared_bytes: int
    loop_instructions: int
    per_weight: float
    top: dict[str, int]  # the most frequent opcodes of the loop


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def tools_available() -> bool:
    return _tool("cuobjdump").exists() and _tool("ptxas").exists()


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, divisible=_DIVISIBLE):
    """`divisible`: the arguments a launch would find divisible by 16 (Triton specializes on it, and
    the vector width of every load and store follows): leave one out and the count is not the launch's."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible if a in signature}
    # Constexprs left out take their defaults, as a launch that does not pass them would.
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    src = ASTSource(fn, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(_tool("cuobjdump")), flag, str(path)], capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """ptxas's resources of the kernel: registers a thread (REG), spill stack bytes (STACK), shared bytes."""
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(cubin, "-res-usage"))}


def _sass(cubin: bytes) -> tuple[str, int]:
    return _cuobjdump(cubin, "-sass"), resource_usage(cubin).get("REG", -1)


def longest_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest span from a backward branch's target to the branch."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    best = collections.Counter()
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"BRA\s.*?(0x[0-9a-f]+)", text)
        start = index.get(int(target.group(1), 16)) if target else None
        if start is not None and start < i:
            body = (re.sub(r"^@!?U?P[T\d]\s+", "", t) for _, t in ins[start : i + 1])  # drop predicates
            ops = collections.Counter(line.split()[0].split(".")[0] for line in body)
            if sum(ops.values()) > sum(best.values()):
                best = ops
    return best


def _count(label: str, fn, signature: dict, constexprs: dict, warps: int, stages: int, weights: int) -> LoopCount:
    kernel = compile_sm90(fn, signature, constexprs, warps, stages)
    sass, regs = _sass(kernel.asm["cubin"])
    ops = longest_loop(sass)
    n = sum(ops.values())
    return LoopCount(label, regs, kernel.metadata.shared, n, n / weights, dict(ops.most_common(6)))


def mma_counts(group: int = 128, configs: list[tuple] | None = None) -> list[LoopCount]:
    """The tensor-core kernel (engine/quant/int4_mma.py), each tuned config (or `configs`), batch 1."""
    from engine.quant import int4_mma

    sig = MMA_SIGNATURE
    out = []
    for n, step, split, warps, stages in configs or int4_mma._MMA_CONFIGS:
        consts = {"GROUP": group, "OFFSET": 128.0, "HAS_BIAS": False, "BLOCK_N": n, "STEP_GROUPS": step,
                  "SPLIT_K": split, "EVEN": True, "PDL": False, "PREFETCH_GROUPS": 0}
        weights = n * step * group // (32 * warps)  # per thread per step
        label = f"triton-mma BLOCK_N {n} STEP_GROUPS {step} SPLIT_K {split} warps {warps} stages {stages}"
        out.append(_count(label, int4_mma._int4_mma_kernel, sig, consts, warps, stages, weights))
    return out


def matvec_counts(group: int = 128, configs: list[tuple] | None = None) -> list[LoopCount]:
    """The fp32 matvec (engine/quant/kernels.py), each tuned config (or `configs`), x as bf16 quads."""
    from engine.quant import kernels

    sig = {"x_ptr": "*i64", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "b_ptr": "*bf16", "y_ptr": "*bf16",
           "part_ptr": "*fp32", "count_ptr": "*i32", "N": "i32", "K": "i32", "stride_wn": "i32", "stride_sn": "i32",
           "exp_one": "i32"}
    out = []
    for n, k, split, warps, stages in configs or kernels._INT4_MATVEC:
        consts = {"GROUP": group, "HAS_BIAS": False, "X_QUADS": True, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}
        label = f"triton     BLOCK_N {n} BLOCK_K {k} SPLIT_K {split} warps {warps} stages {stages}"
        out.append(_count(label, kernels._int4_matvec_kernel, sig, consts, warps, stages, n * k // (32 * warps)))
    return out


def decode_attention_usage(num_splits: int = 4, combine_in_kernel: bool = True, rope: bool = False) -> dict[str, int]:
    """Registers, stack and shared memory of decode_attention_kernel's compile."""
    return resource_usage(decode_attention_kernel(num_splits, combine_in_kernel, rope).asm["cubin"])


def decode_attention_kernel(num_splits: int = 4, combine_in_kernel: bool = True, rope: bool = False,
                            preload: bool = False):
    """The decode attention kernel (engine/attention/triton_paged.py) as the 8B model's
    batch-1 step launches it: 4 query heads a KV head, head dim 128, block size 16, bf16, PDL, every
    pointer, stride and head count divisible by 16 (all but the block table's row stride, which
    the kernel does not specialize on), its reads before the PDL wait as paged_decode_attention
    launches it. rope: the new token's rotary and cache write in the kernel; preload (with rope):
    the first tile of keys and values read before the wait."""
    from engine.attention import triton_paged as tp

    ints = ("num_heads", "stride_qb", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb", "stride_vt",
            "stride_vh", "stride_btb", "stride_ob", "stride_oh")
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
           "out_ptr": "*bf16", "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "qk_scale": "fp32", **{n: "i32" for n in ints}}
    consts = {"GROUP": 4, "GROUP_M": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": tp._DECODE_BLOCK_N,
              "NUM_SPLITS": num_splits, "QUERY_LEN": 1, "DOT_PRECISION": "ieee", "PDL": True,
              "SPLITS_POW2": 1 << (num_splits - 1).bit_length(), "EARLY_READS": tp._DECODE_EARLY_READS,
              "PREFETCH_TOKENS": tp._DECODE_PREFETCH_TOKENS, "PRELOAD": preload and rope}
    if combine_in_kernel:
        sig["count_ptr"] = "*i32"
    else:
        consts["count_ptr"] = None
    rope_args = ("k_new_ptr", "v_new_ptr", "cos_ptr", "sin_ptr", "pos_ptr", "slot_ptr", "stride_nt", "stride_nh", "stride_table")
    if rope:
        consts["ROPE"] = True
        sig.update({"k_new_ptr": "*bf16", "v_new_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64",
                    "slot_ptr": "*i64", "stride_nt": "i32", "stride_nh": "i32", "stride_table": "i32"})
    else:
        consts.update({name: None for name in rope_args[:6]})
        consts.update({name: 0 for name in rope_args[6:]})
    divisible = [a for a in sig if a not in ("qk_scale", "stride_btb")]
    return compile_sm90(tp._decode_kernel, sig, consts, 4, 3, divisible)


def main() -> None:
    for c in matvec_counts() + mma_counts():
        print(f"{c.label:<72} {c.per_weight:5.2f} / weight  ({c.loop_instructions} in the loop, "
              f"{c.registers} registers, {c.shared_bytes // 1024} KiB shared)  {c.top}")
    for splits in (4, 33):
        for combine in (True, False):
            print(f"decode attention, 8B batch 1, {splits} splits, combine {'in kernel' if combine else 'kernel'}: "
                  f"{decode_attention_usage(splits, combine)}")


if __name__ == "__main__":
    main()
