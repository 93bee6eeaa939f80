"""CUDA graphs for steps that hold prompt tokens: one graph per piece between two attention calls.

A step with prompt tokens (a prefill, or prefills mixed with decodes) of a small
model is, like a decode step, mostly kernel launches, about ten a layer. But the
attention kernel's launch grid follows the batch's query lengths, so the whole
forward pass cannot be one graph for every such batch. Here, per token-count
bucket, everything but attention is captured: the embedding and layer 0 up to
its queries; each layer's output projection, MLP and the next layer's norm,
projections and K/V write; and the last layer's rest with the final norm.
Attention runs between the replays on the step's real metadata. (vLLM's
"piecewise" graphs split the model at the same places.)

Under load through Serve, new requests reach the engine a few at a time, so
many steps carry a prompt: each ran eagerly before this, at several times the
host time of a decode step.

Only static buffers cross from one piece to the next (queries, the running
residual, attention's output), so the pieces' own intermediates can share one
memory pool. Rows past the step's tokens read token 0 at position 0 and write
their K/V to the null block's slot 0, as the decode graphs' padding rows do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention import AttentionMetadata, paged_attention
from engine.model.llama import LlamaForCausalLM


# Past this many tokens a step's matrix products, not its launches, set its time: it runs eagerly
# rather than padded to a bucket (a pad row costs as much as a real one).
MIXED_GRAPH_MAX_TOKENS = 2048


def token_buckets(max_tokens: int) -> list[int]:
    """16, 24, 32, 48, 64, ...: powers of two and one and a half times them, below max_tokens, then
    max_tokens; padding a step to its bucket adds at most half its rows, a third on average."""
    sizes = sorted(m * 2**e for e in range(3, 31) for m in (2, 3))
    return [s for s in sizes if s < max_tokens] + [max_tokens]


class MixedStepGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, max_tokens: int, capture: bool = True) -> None:
        """capture=False runs the same pieces eagerly (the CPU, tests)."""
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = token_buckets(max_tokens)
        arch = model.arch
        dev, dtype = kv_cache.device, kv_cache.dtype
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.queries = torch.zeros(n, arch.num_heads, arch.head_dim, dtype=dtype, device=dev)
        self.attn = torch.zeros_like(self.queries)
        self.residual = torch.zeros(n, arch.hidden_size, dtype=dtype, device=dev)
        self.hidden = torch.zeros_like(self.residual)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture()

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.buckets[-1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, as model(input_ids, positions, kv_cache, meta).

        The result is a view of a static buffer: valid until the next run."""
        t = input_ids.shape[0]
        b = next(s for s in self.buckets if s >= t)
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.slot_mapping[:t].copy_(meta.slot_mapping)
        if b > t:  # padding rows must write nowhere a sequence reads; their ids and positions can be stale
            self.slot_mapping[t:b].zero_()
        pieces = self._graphs.get(b)
        for i in range(len(self.model.layers) + 1):
            if pieces is not None:
                pieces[i].replay()
            else:
                self._piece(i, b)()
            if i < len(self.model.layers):
                layer_cache = self.kv_cache[i]
                scale = self.model.layers[i].self_attn.scale
                paged_attention(self.queries[:t], layer_cache[0], layer_cache[1], meta, scale, out=self.attn[:t])
        return self.hidden[:t]

    def _piece(self, i: int, b: int) -> Callable[[], None]:
        """Piece i for b rows: everything after layer i - 1's attention up to layer i's (the last: to the end)."""
        model, layers = self.model, self.model.layers

        def piece() -> None:
            if i == 0:
                x, residual = model.embed_tokens(self.input_ids[:b]), None
            else:
                x, residual = layers[i - 1].after_attention(self.attn[:b], self.residual[:b])
            if i == len(layers):
                self.hidden[:b].copy_(model.norm(x, residual)[0])
                return
            queries, residual = layers[i].before_attention(
                x, residual, self.positions[:b], model.rotary, self.kv_cache[i], self.slot_mapping[:b]
            )
            self.queries[:b].copy_(queries)
            self.residual[:b].copy_(residual)

        return piece

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            graphs = []
            for i in range(len(self.model.layers) + 1):
                piece = self._piece(i, b)
                piece()  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    piece()
                graphs.append(graph)
            self._graphs[b] = graphs
        torch.cuda.synchronize()
