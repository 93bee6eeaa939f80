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


# What backend "auto" means per method on CUDA. int4: PyTorch's tinygemm, which the W3
# kernel check measured faster per layer than our first Triton matvec (1,400-2,090 vs
# 870-1,360 GB/s); `python -m bench.quant --modes int4-triton,int4-torch` times both end to
# end, and this entry follows the faster. fp8: our Triton decode kernel (W3: 240 tok/s).
AUTO_BACKEND = {"int8": "triton", "int4": "torch", "fp8": "triton"}


def resolve_backend(method: str, backend: str) -> str:
    if backend == "auto":
        return AUTO_BACKEND.get(method, "triton")
    if backend == "triton-mma" and method != "int4":
        return "triton"  # an int4 kernel: the other methods keep our Triton ones
    return backend


def set_backend_(model: nn.Module, backend: str) -> None:
    """"triton": our kernels for few rows; "torch": PyTorch's own int4 (tinygemm) and fp8 (_scaled_mm)
    ops; "triton-mma": int4 on our tensor-core kernel (int4_mma.py; bf16 / fp16 models, the others
    keep the matvec), int8 / fp8 as "triton"; "auto": AUTO_BACKEND's choice per layer kind. Runs
    once at load: tinygemm's and the mma kernel's repacking happen here, never per call, so a
    captured CUDA graph replays only the matmul."""
    repacked = False
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.use_triton = resolve_backend("fp8", backend) == "triton"
        elif isinstance(module, Int4Linear) and not (module.tinygemm or module.mma):
            int4 = resolve_backend("int4", backend)
            if int4 == "torch" and _tinygemm_suits(module, explicit=backend == "torch"):
                module.to_tinygemm_()
            elif int4 == "triton-mma" and module.mma_supported():
                module.to_mma_()
                module.mma_workspace()
                repacked = True
            elif module.qweight.is_cuda:
                module.matvec_workspace()
    if repacked and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the repacking's temporaries go back to the KV cache sizing


def _tinygemm_suits(module: Int4Linear, explicit: bool) -> bool:
    # tinygemm computes in bf16: "auto" keeps fp16 / fp32 models on our kernel, where x keeps
    # its dtype; an explicit "torch" is obeyed wherever tinygemm can run the layer.
    return module.tinygemm_supported() and (explicit or module.scales.dtype == torch.bfloat16)


def backend_summary(model: nn.Module) -> str:
    """Which kernels the quantized layers run on CUDA, e.g. "int4: torch 225" (reports, benches)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Int4Linear):
            key = "int4: " + ("torch" if module.tinygemm else "triton-mma" if module.mma else "triton")
        elif isinstance(module, Fp8Linear):
            key = "fp8: " + ("triton" if module.use_triton else "torch")
        elif isinstance(module, Int8Linear):
            key = "int8: triton"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
