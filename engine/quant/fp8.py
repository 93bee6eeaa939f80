"""fp8 (e4m3) weights and activations: per-output-channel weight scales, per-token activation scales.

    s[n] = max_k |W[n, k]| / 448     Wq = e4m3(W / s)
    a[m] = max_k |x[m, k]| / 448     xq = e4m3(x / a)        y = (xq @ Wq^T) * a[m] * s[n]

Runs where fp8 tensor cores are (CUDA compute capability >= 8.9: Ada,
Hopper): torch._scaled_mm (row-wise scales, bf16 out) for many rows, and
the Triton kernel in engine/quant/kernels.py, which quantizes the rows
itself, for a few (decode). The CPU can hold and emulate the format (the
tests check the math that way) but the engine refuses to run it there.
"""

from __future__ import annotations

import torch

from engine.errors import ConfigError
from engine.quant.base import PerChannelLinear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Rows up to which CUDA uses the Triton kernel (per-token quantization fused into the product).
FP8_KERNEL_MAX_ROWS = 16


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """None when `device` can run fp8 matrix products, else why not."""
    if device.type != "cuda":
        return f"fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper); this engine runs on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper); {name} is {major}.{minor}"
    return None


def check_fp8_device(device: torch.device) -> None:
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise ConfigError(reason + "; use quantization int8 or int4 instead")


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [N, K], fp32 scales [N]) of a float weight [N, K]."""
    wf = w.float()
    s = wf.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    q = (wf / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [M, K], fp32 scales [M, 1]) of activations [M, K], one scale per row (token)."""
    xf = x.float()
    a = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / a).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), a


class Fp8Linear(PerChannelLinear):
    method = "fp8"
    weight_dtype = FP8_DTYPE
    quantize_weight = staticmethod(quantize_fp8_weight)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight, scales, bias)
        self.use_triton = True  # False: torch._scaled_mm for every row count

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Emulation in fp32: exactly the products of e4m3 values that the GPU sums."""
        xq, a = quantize_fp8_rows(x)
        y = (xq.float() @ self.qweight.float().t()) * a * self.scales[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and x.shape[0] <= FP8_KERNEL_MAX_ROWS:
            from engine.quant import kernels

            return kernels.quant_matmul(x, kernels.FMT_FP8, self.qweight, self.scales, bias=self.bias)
        xq, a = quantize_fp8_rows(x)
        y = torch._scaled_mm(
            xq, self.qweight.t(), scale_a=a, scale_b=self.scales[None, :], out_dtype=torch.bfloat16
        ).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)
