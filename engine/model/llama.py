"""Our forward pass for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

One flattened batch of T new tokens from many sequences per call; attention
reads and writes the paged KV cache through AttentionMetadata. Projections
are fused (qkv, gate+up) so a step launches fewer, larger matrix products;
they stay plain nn.Linear modules so quantization can swap them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.model.arch import ModelArch, rope_inv_freq
from engine.model.fused_ops import add_rmsnorm, fold_add_norm, norm_linear, rope_and_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add is fused into the norm."""
        return add_rmsnorm(x, residual, self.weight, self.eps)


class Rotary(nn.Module):
    """Neox-style rotary embedding: cos/sin tables indexed by position (fp32)."""

    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(arch))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.scale = self.head_dim**-0.5

    def rotate_and_cache(
        self,
        qkv: torch.Tensor,  # [T, q_size + 2 kv_size]: qkv_proj's output
        positions: torch.Tensor,
        rotary: Rotary,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D]
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """The rotated queries [T, H, D]; the new keys and values go into the cache."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # Norm + rotary of q and k, and the new K/V into the cache, in one step (one kernel on CUDA).
        q = rope_and_cache(
            q, k, v, rotary.cos, rotary.sin, positions,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.q_norm.eps if self.q_norm is not None else 0.0,
            kv_cache[0], kv_cache[1], slot_mapping,
        )
        return q

    def decode_rope(self, qkv: torch.Tensor, positions: torch.Tensor, rotary: Rotary, meta: AttentionMetadata):
        """(raw queries [T, H, D], a DecodeRope): the rotary and the cache write of a small CUDA decode
        pass inside the decode attention kernel (engine/attention/triton_paged.py), no kernel of
        their own; None where that does not apply (the CPU, prefill, a per-head norm, big batches)."""
        if not (qkv.is_cuda and meta.is_decode_only and self.q_norm is None):
            return None
        from engine.attention.triton_paged import DecodeRope
        from engine.pdl import PDL_MAX_ROWS

        t = qkv.shape[0]
        if t > PDL_MAX_ROWS:
            return None

        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        kv_shape = (t, self.num_kv_heads, self.head_dim)
        rope = DecodeRope(k.view(kv_shape), v.view(kv_shape), rotary.cos, rotary.sin, positions, meta.slot_mapping)
        return q.view(t, self.num_heads, self.head_dim), rope


class MLP(nn.Module):
    """silu(gate) * up through down_proj; the layer runs the pieces (its norm may join gate_up)."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)
        # Set by the engine (EngineConfig.fused_norm_linear): small batches on CUDA run each norm
        # inside the projection after it (engine/model/norm_linear.py).
        self.fuse_norm_linear = False
        # Set by the engine (EngineConfig.decode_folds). fold_norms: int4 layers in the tensor-core
        # form, one token: each residual add and the RMSNorm after it inside the products either
        # side (fused_ops.fold_add_norm). fold_rope: small CUDA decode passes rotate and write the
        # new K/V inside the attention kernel (Attention.decode_rope).
        self.fold_norms = False
        self.fold_rope = False

    def forward(self, x, residual, positions, rotary, kv_cache, meta, next_layer: "DecoderLayer | None" = None):
        """Returns (this layer's output, the running residual); their sum is the hidden state. With
        next_layer, the output may be a NormedHidden for it (residual None: fused_ops.fold_add_norm)."""
        attn = self.self_attn
        qkv, residual = self._qkv(x, residual)
        folded = attn.decode_rope(qkv, positions, rotary, meta) if self.fold_rope else None
        if folded is None:
            q = attn.rotate_and_cache(qkv, positions, rotary, kv_cache, meta.slot_mapping)
            out = paged_attention(q, kv_cache[0], kv_cache[1], meta, attn.scale)
        else:
            out = paged_attention(folded[0], kv_cache[0], kv_cache[1], meta, attn.scale, rope=folded[1])
        return self.after_attention(out, residual, next_layer)

    # The two pieces either side of attention: engine/mixed_graphs.py replays each as a CUDA graph
    # and launches attention, whose grid depends on the batch's query lengths, between them.

    def before_attention(self, x, residual, positions, rotary, kv_cache, slot_mapping):
        """(queries [T, H, D], the running residual); the new keys and values go into the cache."""
        qkv, residual = self._qkv(x, residual)
        return self.self_attn.rotate_and_cache(qkv, positions, rotary, kv_cache, slot_mapping), residual

    def _qkv(self, x, residual) -> tuple[torch.Tensor, torch.Tensor]:
        """(qkv_proj of the input norm, the running residual)."""
        return norm_linear(x, residual, self.input_layernorm, self.self_attn.qkv_proj, False, self.fuse_norm_linear)

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor, next_layer: "DecoderLayer | None" = None):
        """attn: the attention output [T, H, D]; returns (this layer's output, the running residual),
        or (a NormedHidden for next_layer, None)."""
        attn = attn.reshape(attn.shape[0], self.self_attn.q_size)
        mlp, norm = self.mlp, self.post_attention_layernorm
        folded = fold_add_norm(self.self_attn.o_proj, attn, residual, norm, mlp.gate_up_proj) if self.fold_norms else None
        if folded is None:
            x = self.self_attn.o_proj(attn)
            act, residual = norm_linear(x, residual, norm, mlp.gate_up_proj, True, self.fuse_norm_linear)
        else:
            act, residual = norm_linear(folded, None, norm, mlp.gate_up_proj, True, False)
        if next_layer is not None and self.fold_norms:
            after = fold_add_norm(mlp.down_proj, act, residual, next_layer.input_layernorm, next_layer.self_attn.qkv_proj)
            if after is not None:
                return after, None
        return mlp.down_proj(act), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_word_embeddings else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.rotary = Rotary(arch, max_positions or arch.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, KVH, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states of the new tokens after the final norm: [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1] if i < last else None
            x, residual = layer(x, residual, positions, self.rotary, kv_cache[i], meta, following)
        return self.norm(x, residual)[0]

    def set_fused_norm_linear(self, on: bool) -> None:
        """Before any CUDA graph is captured: the layers' forward reads it while being captured."""
        for layer in self.layers:
            layer.fuse_norm_linear = on

    def set_decode_folds(self, on: bool) -> None:
        """Before any CUDA graph is captured (EngineConfig.decode_folds): both folds of the layers."""
        for layer in self.layers:
            layer.fold_norms = layer.fold_rope = on

    @contextlib.contextmanager
    def fused_norm_linear(self, on: bool) -> Iterator[None]:
        """The layers fused (or not) for what runs (or is captured) inside; as before after."""
        before = [layer.fuse_norm_linear for layer in self.layers]
        self.set_fused_norm_linear(on)
        try:
            yield
        finally:
            for layer, was in zip(self.layers, before):
                layer.fuse_norm_linear = was

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()
