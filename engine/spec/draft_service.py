"""A draft model serving proposals to callers that send token ids only (no Ray here).

deployments/draft_server.py wraps this in a Ray Serve deployment so that a
draft can run on its own (a fraction of a GPU, another node) and serve the
LLM replicas, each of which calls it once per step with its whole batch.

The service keeps a shadow of every caller sequence (by key): a Sequence in
its own paged cache with prefix caching, so a call computes only the tokens
the draft has not seen. The shadow's num_computed_tokens counts the leading
tokens whose draft K/V are in the cache; a call learns how many of its last
proposals the caller kept by comparing them with the tokens it now sends.
Shadows unused longest are dropped first when blocks run out; a dropped or
unknown shadow is rebuilt from the prefix cache and the tokens sent.

At temperature > 0 proposals are drawn from the top `probs_top_k` tokens of
the draft's distribution (renormalized), and exactly that sparse
distribution is returned: rejection sampling only needs the distribution
the proposals were actually drawn from, and this keeps the reply small.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.kv_cache.allocator import PagedKVAllocator
from engine.model.loader import load_model
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.spec.draft import DraftModel
from engine.spec.target_pass import SPEC_GRAPH_MAX_BATCH


@dataclass
class DraftCall:
    """One caller sequence: all its tokens so far, and how many proposals it wants."""

    key: str  # unique across callers, stable for the sequence's life
    token_ids: list[int]
    num_tokens: int
    temperature: float = 0.0


@dataclass
class DraftReply:
    token_ids: list[list[int]]  # per call, at most its num_tokens (empty: no proposal)
    # At temperature > 0: the distribution each proposal was drawn from, as its support and weights.
    top_ids: torch.Tensor | None = None  # [B, k, top] int64, CPU
    top_probs: torch.Tensor | None = None  # [B, k, top] fp32, CPU

    def dense_probs(self, vocab_size: int, k: int, device: torch.device) -> torch.Tensor | None:
        """The distributions as [B, k, vocab] on `device` (None at temperature 0)."""
        if self.top_ids is None:
            return None
        b, kk, _ = self.top_ids.shape
        probs = torch.zeros(b, k, vocab_size, dtype=torch.float32, device=device)
        probs[:, :kk].scatter_(2, self.top_ids.to(device), self.top_probs.to(device))
        return probs


@dataclass
class _Shadow:
    seq: Sequence
    base: int = 0  # the caller's num_tokens at the last call
    pending: list[int] = field(default_factory=list)  # proposals whose K/V the draft computed at that call


class DraftService:
    def __init__(
        self,
        model: str,
        num_speculative_tokens: int,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int = 256 * 2**20,
        max_num_seqs: int = 256,
        vocab_size: int | None = None,  # the target's, if it differs from the draft's
        probs_top_k: int = 32,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        CacheConfig(block_size=block_size, num_blocks=num_blocks)  # the same checks as the engine's cache
        if probs_top_k < 1:
            raise ConfigError("probs_top_k must be >= 1")
        loaded = load_model(model, dtype, device, seed)
        self.model, self.arch = loaded.model, loaded.arch
        self.device = next(self.model.parameters()).device
        dtype_ = next(self.model.parameters()).dtype
        self.k = num_speculative_tokens
        self.block_size = block_size
        arch = self.arch
        elem = torch.empty((), dtype=dtype_).element_size()
        block_bytes = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * elem * block_size
        num_blocks = num_blocks or max(2, kv_cache_bytes // block_bytes)
        self.kv_cache = torch.zeros(
            arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim, dtype=dtype_, device=self.device
        )
        self.allocator = PagedKVAllocator(num_blocks, block_size, enable_prefix_caching=True)
        self.max_model_len = min(arch.max_position_embeddings, self.allocator.capacity_tokens)
        width = -(-(self.max_model_len + self.k) // block_size)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        graph_batch = 0 if enforce_eager else min(max_num_seqs, SPEC_GRAPH_MAX_BATCH)
        self.vocab_size = vocab_size or arch.vocab_size
        self.probs_top_k = min(probs_top_k, self.vocab_size)
        self.draft = DraftModel(
            self.model, self.kv_cache, block_size, self.k, self.vocab_size, width, graph_batch, gen,
            sample_top_k=self.probs_top_k,
        )
        self._shadows: OrderedDict[str, _Shadow] = OrderedDict()  # least recently used first
        self._ids = itertools.count()

    @property
    def num_sequences(self) -> int:
        return len(self._shadows)

    def release(self, keys: list[str]) -> None:
        for key in keys:
            shadow = self._shadows.pop(key, None)
            if shadow is not None:
                self.allocator.free(shadow.seq)

    def propose(self, calls: list[DraftCall], release: list[str] = ()) -> DraftReply:
        self.release(list(release))
        replies: list[list[int]] = [[] for _ in calls]
        busy = {c.key for c in calls}
        rows: list[tuple[int, _Shadow, int]] = []
        for i, call in enumerate(calls):
            k = min(call.num_tokens, self.k, self.max_model_len - len(call.token_ids) + 1)
            if k < 1 or not call.token_ids:
                continue
            shadow = self._sync(call, k, busy)
            if shadow is not None:
                rows.append((i, shadow, k))
        if not rows:
            return DraftReply(replies)
        seqs = [shadow.seq for _, shadow, _ in rows]
        starts = [min(s.num_computed_tokens, s.num_tokens - 1) for s in seqs]
        ks = [k for _, _, k in rows]
        proposals = self.draft.propose(seqs, starts, ks)
        tokens = proposals.token_ids.tolist()
        for (i, shadow, k), row in zip(rows, tokens):
            seq = shadow.seq
            replies[i] = row[:k]
            shadow.base = seq.num_computed_tokens = seq.num_tokens
            shadow.pending = row[: k - 1]
            self.allocator.cache_full_blocks(seq)
        if proposals.probs is None:
            return DraftReply(replies)
        # Only rows that sampled carry a distribution worth sending; greedy rows send their (unused) top too.
        top_probs, top_ids = proposals.probs.topk(self.probs_top_k, dim=2)
        b = len(calls)
        ids = torch.zeros(b, self.k, self.probs_top_k, dtype=torch.int64)
        probs = torch.zeros(b, self.k, self.probs_top_k, dtype=torch.float32)
        index = torch.tensor([i for i, _, _ in rows], dtype=torch.int64)
        ids[index] = top_ids.cpu()
        probs[index] = top_probs.cpu()
        return DraftReply(replies, ids, probs)

    def _sync(self, call: DraftCall, k: int, busy: set[str]) -> _Shadow | None:
        """The call's shadow, extended with the tokens sent and with room for k - 1 proposals; None if no room."""
        shadow = self._shadows.get(call.key)
        if shadow is not None:
            seq = shadow.seq
            n = seq.num_tokens
            if len(call.token_ids) < n or call.token_ids[:n] != seq.token_ids:
                self.release([call.key])  # not a continuation of what we saw: start over
                shadow = None
        if shadow is None:
            seq = Sequence(next(self._ids), call.key, 0, call.token_ids, SamplingParams(temperature=call.temperature), time.monotonic())
            prefix = self.allocator.find_cached_prefix(seq)
            if not self._allocate(seq, seq.num_tokens - prefix.num_tokens + k - 1, busy, prefix):
                return None
            seq.num_computed_tokens = prefix.num_tokens
            shadow = self._shadows[call.key] = _Shadow(seq)
        else:
            new = call.token_ids[seq.num_tokens :]
            kept = 0
            while kept < len(shadow.pending) and kept < len(new) and new[kept] == shadow.pending[kept]:
                kept += 1
            seq.num_computed_tokens = shadow.base + kept
            seq.token_ids.extend(new)
            seq.params.temperature = call.temperature
            if not self._allocate(seq, seq.num_tokens + k - 1 - seq.num_computed_tokens, busy):
                self.release([call.key])
                return None
            self._shadows.move_to_end(call.key)
        return shadow

    def _allocate(self, seq: Sequence, num_tokens: int, busy: set[str], prefix=None) -> bool:
        while not self.allocator.allocate_slots(seq, num_tokens, prefix):
            victim = next((key for key in self._shadows if key not in busy), None)
            if victim is None:
                return False
            self.release([victim])
        return True
