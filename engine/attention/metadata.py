"""The per-step description of a batch that every attention layer reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A flattened batch of B sequences holding T new tokens in all.

    Sequence b owns new tokens query_start_loc[b]:query_start_loc[b+1]; after
    this step its context holds seq_lens[b] tokens, the new ones last, so new
    token j of b sits at position seq_lens[b] - query_len[b] + j and attends
    to context positions 0..that position. Its KV lives in the blocks of
    block_tables[b] (padded with 0 past the blocks it owns).

    The KV cache of one layer is k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim]; a new token's K/V go to flat slot
    slot_mapping[t] = block_id * block_size + offset.
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, so the reference path never syncs with the device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Set by fixed-shape passes in which every sequence feeds exactly this many new tokens (the
    # speculative verify pass, the draft's catch-up): the kernels may treat each as a decode query.
    uniform_query_len: int | None = None
    # int32 zeros, one per (new token, KV head) at least, that the decode kernel's splits count their
    # arrivals on, so that the last one combines them (engine/attention/triton_paged.py); held by a
    # decode graph, whose replays then launch one attention kernel a layer. None: a second kernel combines.
    split_counters: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
