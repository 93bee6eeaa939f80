"""int8 weight-only, symmetric, one scale per output channel; and the int8 token embedding.

    s[n] = max_k |W[n, k]| / 127      q[n, k] = round(W[n, k] / s[n]) in [-127, 127]

Scales are fp32 (N of them: no weight to speak of). The embedding table uses
the same scheme per row (one scale per token), gathered row by row.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quant.base import KERNEL_MAX_ROWS, PerChannelLinear


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], s fp32 [N]) of a float weight [N, K]."""
    wf = w.float()
    s = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


class Int8Linear(PerChannelLinear):
    method = "int8"
    weight_dtype = torch.int8
    quantize_weight = staticmethod(quantize_int8)

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > KERNEL_MAX_ROWS:
            return self.forward_reference(x)
        from engine.quant import kernels

        return kernels.quant_matmul(x, kernels.FMT_INT8, self.qweight, self.scales, bias=self.bias)


class Int8Embedding(nn.Module):
    """The token embedding table in int8 with one scale per row; looks up rows, then scales them."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)  # int8 [V, H]
        self.register_buffer("scales", scales)  # [V], in the model's dtype (which the output takes)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Int8Embedding":
        w = embedding.weight.data
        q, s = quantize_int8(w)
        return cls(q, s.to(w.dtype))

    @classmethod
    def empty(cls, num: int, dim: int, dtype: torch.dtype, device) -> "Int8Embedding":
        return cls(
            torch.empty(num, dim, dtype=torch.int8, device=device), torch.empty(num, dtype=dtype, device=device)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).to(self.scales.dtype) * self.scales.index_select(0, flat)[:, None]
        return rows.view(*ids.shape, self.embedding_dim)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
