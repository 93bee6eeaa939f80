"""engine/model/llama.py: what a decode pass's attention asks the L2 for is o_proj's own weight bytes."""

from __future__ import annotations

import torch
from torch import nn

from engine.quant.int4 import Int4Linear
from engine.quant.int8 import Int8Linear


def test_attention_names_the_bytes_its_o_proj_reads(llama_ckpt, make_engine):
    attn = make_engine(llama_ckpt).model.layers[0].self_attn
    assert attn.o_proj_weights() is attn.o_proj.weight  # a plain layer: its weight
    torch.manual_seed(0)
    linear = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    int4 = Int4Linear.from_float(linear, group=32)
    attn.o_proj = int4
    assert attn.o_proj_weights() is int4.qweight  # the Triton matvec's codes
    int4.to_mma_()
    assert attn.o_proj_weights() is int4.mma_qweight and int4.mma_qweight.dtype == torch.int32  # the tensor-core form
    attn.o_proj = Int8Linear.from_float(linear)
    assert attn.o_proj_weights() is attn.o_proj.qweight
