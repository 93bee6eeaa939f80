"""What every quantized linear layer shares: shapes, bias, the dispatch between kernel and reference.

A quantized layer stands in for an nn.Linear: same in/out features, same
forward signature. Its tensors are buffers (not parameters), so they travel
with .to(device), state_dict() and safetensors like any weight, and the
first *parameter* of a quantized model (a norm weight) still tells its dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows, CUDA runs the Triton kernels (decode, speculative verification);
# beyond, the layer dequantizes to x's dtype and calls cuBLAS (prefill is compute-bound).
KERNEL_MAX_ROWS = 64


class QuantLinear(nn.Module):
    method = "none"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.is_cuda:
            y = self.forward_cuda(x2)
        else:
            y = self.forward_reference(x2)
        return y.reshape(*lead, self.out_features)

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_reference(x)

    def folds_residual(self, x: torch.Tensor) -> bool:
        """Whether forward_add_residual runs for x: a layer whose kernel adds the residual and leaves
        the next RMSNorm's inputs (engine/model/fused_ops.py, fold_add_norm) says so."""
        return False

    def folds_norm(self, x: torch.Tensor) -> bool:
        """Whether forward_normed runs for a batch like x (its rows, device, dtype; see folds_residual)."""
        return False

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then a plain matrix product in x's dtype: the CPU path and the oracle."""
        return F.linear(x, self.dequantize(x.dtype), self.bias_as(x.dtype))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] that this layer multiplies by."""
        raise NotImplementedError

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PerChannelLinear(QuantLinear):
    """A weight quantized per output channel: qweight [N, K] of `weight_dtype` and fp32 scales [N].

    Subclasses name the storage type and the quantizer (int8, fp8); building,
    loading and dequantizing are the same for all of them.
    """

    weight_dtype: torch.dtype

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)  # weight_dtype [N, K]
        self.register_buffer("scales", scales)  # fp32 [N]

    @staticmethod
    def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [N, K] of weight_dtype, s fp32 [N]) of a float weight [N, K]."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "PerChannelLinear":
        q, s = cls.quantize_weight(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data.clone()
        return cls(q, s, bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, has_bias: bool, dtype: torch.dtype, device) -> "PerChannelLinear":
        bias = torch.empty(out_features, dtype=dtype, device=device) if has_bias else None
        return cls(
            torch.empty(out_features, in_features, dtype=cls.weight_dtype, device=device),
            torch.empty(out_features, dtype=torch.float32, device=device),
            bias,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scales[:, None]).to(dtype)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and persistent buffers (what a checkpoint of it holds)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
