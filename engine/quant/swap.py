"""The module swap: every nn.Linear of the model becomes its quantized counterpart, the embedding int8.

Which layers: all projections of every decoder layer (qkv_proj, o_proj,
gate_up_proj, down_proj) and lm_head. A model with tied embeddings gets an
lm_head of its own first (a copy of the embedding), so the output projection
is quantized in the chosen format while the input embedding table is stored
in int8 rows (a lookup reads one row per token, so its format costs no
speed; int8 keeps it exact enough and halves its bytes).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import QuantConfig
from engine.quant.awq import AwqResult, apply_awq_
from engine.quant.calibration import capture_linear_inputs
from engine.quant.fp8 import Fp8Linear
from engine.quant.int4 import Int4Linear
from engine.quant.int8 import Int8Embedding, Int8Linear

QUANT_LINEAR = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}


def untie_lm_head_(model: nn.Module) -> None:
    """Gives a tied model an lm_head of its own (a copy of the embedding); compute_logits then uses it."""
    if model.lm_head is not None:
        return
    emb = model.embed_tokens.weight
    head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
    if emb.device.type != "meta":
        head.weight.data.copy_(emb.data)
    head.requires_grad_(False)
    model.lm_head = head


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_linear(linear: nn.Linear, config: QuantConfig) -> nn.Module:
    if config.method == "int4":
        return Int4Linear.from_float(linear, config.group_size)
    return QUANT_LINEAR[config.method].from_float(linear)


@torch.no_grad()
def quantize_model_(
    model: nn.Module, config: QuantConfig, calibration: list[list[int]] | None = None
) -> list[AwqResult]:
    """Quantizes a float model in place; int4 with awq searches scales on `calibration` first."""
    untie_lm_head_(model)
    results: list[AwqResult] = []
    if config.method == "int4" and config.awq:
        if not calibration:
            raise ValueError("int4 with awq needs calibration sequences")
        inputs = capture_linear_inputs(model, calibration)
        results = apply_awq_(model, inputs, config.group_size)
        del inputs
    for name in linear_names(model):
        _replace(model, name, quantize_linear(model.get_submodule(name), config))
    model.embed_tokens = Int8Embedding.from_float(model.embed_tokens)
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()  # the float weights' memory goes back to the KV cache sizing
    return results


def build_empty_quantized_(model: nn.Module, config: QuantConfig, dtype: torch.dtype) -> None:
    """Swaps in empty quantized modules of the right shapes (on the model's device: meta when loading)."""
    untie_lm_head_(model)
    device = model.embed_tokens.weight.device
    for name in linear_names(model):
        lin = model.get_submodule(name)
        shape = (lin.in_features, lin.out_features, lin.bias is not None)
        if config.method == "int4":
            module = Int4Linear.empty(*shape, config.group_size, dtype, device)
        else:
            module = QUANT_LINEAR[config.method].empty(*shape, dtype, device)
        _replace(model, name, module)
    emb = model.embed_tokens
    model.embed_tokens = Int8Embedding.empty(emb.num_embeddings, emb.embedding_dim, dtype, device)


def set_backend_(model: nn.Module, backend: str) -> None:
    """"triton": our kernels for few rows; "torch": PyTorch's own int4 (tinygemm) and fp8 (_scaled_mm) ops."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.use_triton = backend == "triton"
        elif isinstance(module, Int4Linear) and backend == "torch" and not module.tinygemm:
            if module.tinygemm_supported():
                module.to_tinygemm_()
