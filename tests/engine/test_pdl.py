"""engine/pdl.py: when the decode kernels launch with PDL, and the order their PTX keeps.

The order is the safety rule of PDL: a kernel launched with it may run while the kernel ahead is
still writing, so nothing but reads of what no such kernel writes (the weights, the step's staged
inputs, earlier steps' KV cache) may come before its `griddepcontrol.wait`, and no store. The
kernels are compiled for sm_90 offline (Triton's own ptxas, no GPU), in a fresh process: the
interpreter tests of this session switch TRITON_INTERPRET on.
"""

from __future__ import annotations

import pytest
import torch

from bench import sass_count
from engine import pdl
from engine.pdl import cuda_runtime_supports_pdl, launch_options, pdl_enabled, use_pdl
from tests.triton_interpreter import fresh_process_json


def test_pdl_is_off_on_the_cpu_under_the_interpreter_and_when_switched_off(monkeypatch):
    assert not pdl_enabled(torch.device("cpu"))
    assert launch_options(torch.device("cpu"), 1) == {"PDL": False, "launch_pdl": False}
    # Neither of these asks the (absent) GPU for its capability.
    monkeypatch.setenv("ENGINE_PDL", "0")
    assert not pdl_enabled(torch.device("cuda", 0))
    monkeypatch.delenv("ENGINE_PDL")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda", 0))


def test_pdl_needs_a_cuda_runtime_that_captures_it_in_graphs():
    assert cuda_runtime_supports_pdl("12.3") and cuda_runtime_supports_pdl("12.8") and cuda_runtime_supports_pdl("13.0")
    assert not cuda_runtime_supports_pdl("12.2") and not cuda_runtime_supports_pdl("11.8")
    assert not cuda_runtime_supports_pdl(None)  # a CPU build of torch


def test_only_launches_of_few_tokens_use_pdl(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(pdl, "pdl_enabled", lambda device: device == gpu)  # a Hopper GPU, without one
    assert use_pdl(gpu, 1) and use_pdl(gpu, pdl.PDL_MAX_ROWS)
    assert not use_pdl(gpu, pdl.PDL_MAX_ROWS + 1)
    assert launch_options(gpu, 1) == {"PDL": True, "launch_pdl": True}
    assert launch_options(gpu, 256) == {"PDL": False, "launch_pdl": False}


_PTX = """
import json
import re
from bench.sass_count import MMA_SIGNATURE, compile_sm90, decode_attention_kernel
from engine.model import triton_ops
from engine.quant import int4_mma

def order(ptx):
    lines = [re.sub(r"^@!?%p\\d+\\s+", "", l.strip()) for l in ptx.splitlines()]  # predicates dropped
    def first(*ops):
        return next((i for i, l in enumerate(lines) if l.startswith(ops)), None)
    return {"signal": first("griddepcontrol.launch_dependents"), "wait": first("griddepcontrol.wait"),
            "prefetch": first("prefetch.global.L2"), "memory": first("ld.global", "st.global", "cp.async", "atom."),
            "store": first("st.global", "atom.", "red."), "async_copy": first("cp.async"),
            "reads_before_wait": sum(l.startswith("ld.global") for l in lines[:first("griddepcontrol.wait") or 0])}

out = {}
for pdl in (True, False):
    consts = {"GROUP": 128, "OFFSET": 128.0, "HAS_BIAS": False, "BLOCK_N": 64, "STEP_GROUPS": 4, "SPLIT_K": 4,
              "EVEN": True, "PDL": pdl, "PREFETCH_GROUPS": int4_mma.PREFETCH_GROUPS}
    out[f"mma {pdl}"] = order(compile_sm90(int4_mma._int4_mma_kernel, MMA_SIGNATURE, consts, 4, 2).asm["ptx"])
for fold in ("ADD_RESIDUAL", "NORM_IN"):  # the norm folding's epilogues
    consts = {"GROUP": 128, "OFFSET": 128.0, "HAS_BIAS": False, "BLOCK_N": 64, "STEP_GROUPS": 4, "SPLIT_K": 4,
              "EVEN": True, "PDL": True, "PREFETCH_GROUPS": int4_mma.PREFETCH_GROUPS, fold: True, "SLOTS": 256}
    out[f"mma {fold}"] = order(compile_sm90(int4_mma._int4_mma_kernel, MMA_SIGNATURE, consts, 4, 2).asm["ptx"])
out["attention rope"] = order(decode_attention_kernel(4, True, rope=True).asm["ptx"])
out["attention preload"] = order(decode_attention_kernel(4, False, rope=True, preload=True).asm["ptx"])
norm_sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
            "stride_x": "i32", "stride_res": "i32", "stride_out": "i32", "stride_res_out": "i32", "n_cols": "i32",
            "eps": "fp32"}
out["norm True"] = order(compile_sm90(triton_ops._add_rmsnorm_kernel, norm_sig,
                                      {"HAS_RESIDUAL": True, "BLOCK": 4096, "PDL": True}, 4, 1).asm["ptx"])
print(json.dumps(out))
"""


@pytest.mark.skipif(not sass_count.tools_available(), reason="no ptxas in the triton wheel")
def test_kernels_signal_then_wait_before_any_memory_access_but_the_weight_prefetch():
    found = fresh_process_json(_PTX)
    for name in ("mma True", "norm True", "mma ADD_RESIDUAL", "mma NORM_IN"):
        o = found[name]
        assert o["memory"] is not None and o["signal"] < o["wait"] < o["memory"], (name, o)
    mma = found["mma True"]
    assert mma["prefetch"] is not None and mma["prefetch"] < mma["wait"]
    # Decode attention reads the step's inputs and asks the L2 for its keys and values first (what
    # no kernel launched with PDL writes); every store and the loop's copies of K / V come after.
    attn = found["attention rope"]
    assert attn["signal"] < attn["wait"] < attn["store"] and attn["wait"] < attn["async_copy"], attn
    assert attn["memory"] < attn["prefetch"] < attn["wait"], attn
    # Preloaded, the first tile's keys and values are read before the wait too; still no store.
    pre = found["attention preload"]
    assert pre["signal"] < pre["wait"] < pre["store"] and pre["reads_before_wait"] > attn["reads_before_wait"], pre
    assert found["norm True"]["prefetch"] is None
    off = found["mma False"]
    assert off["signal"] is None and off["wait"] is None and off["prefetch"] is None
