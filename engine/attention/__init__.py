"""Paged attention: the metadata of one batch, a torch reference, Triton kernels."""

from engine.attention.backend import paged_attention, write_kv
from engine.attention.metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "paged_attention", "write_kv"]
