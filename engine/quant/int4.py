"""int4 weight-only, asymmetric, one scale and zero point per group of `group` input channels.

Round to nearest (RTN), per output row n and group g of k:

    s = (max W - min W) / 15       z = round(-min W / s) in [0, 15]
    q = clamp(round(W / s) + z, 0, 15)        W ~ (q - z) * s

Stored: q packed two per byte along k (even k in the low nibble), uint8
[N, K/2]; s in the model's dtype [N, K/group] (q is computed against the
rounded s, so dequantization sees the very scale it was made with); z uint8
[N, K/group]. That is 4 + 24/group bits per weight: 4.19 at group 128.

Activation-aware scaling (AWQ, engine/quant/awq.py) changes W before this
step and folds the inverse into the previous operation; the format is the same.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import ConfigError
from engine.quant.base import KERNEL_MAX_ROWS, QuantLinear

TINYGEMM_INNER_K_TILES = 8


def effective_group(in_features: int, group: int) -> int:
    """The group size used for a layer: `group`, or the whole row when the row is shorter."""
    g = min(group, in_features)
    if in_features % g or g % 2:
        raise ConfigError(
            f"int4 needs in_features ({in_features}) to be a multiple of an even group_size ({group})"
        )
    return g


def _scales_zeros(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    wmax, wmin = wg.amax(-1), wg.amin(-1)
    s = ((wmax - wmin).clamp(min=1e-5) / 15.0).to(scale_dtype).float()
    z = torch.round(-wmin / s).clamp_(0, 15)
    return s, z


def quantize_int4_codes(w: torch.Tensor, group: int, scale_dtype: torch.dtype):
    """(q uint8 [N, K] in 0..15, s fp32 [N, G], z fp32 [N, G]) of a float weight [N, K]."""
    n, k = w.shape
    s, z = _scales_zeros(w, group, scale_dtype)
    wg = w.float().reshape(n, k // group, group)
    q = (torch.round(wg / s[..., None]) + z[..., None]).clamp_(0, 15)
    return q.reshape(n, k).to(torch.uint8), s, z


def fake_quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Quantize and dequantize (fp32): the weight an int4 layer would multiply by."""
    n, k = w.shape
    q, s, z = quantize_int4_codes(w, group, scale_dtype)
    return ((q.float().reshape(n, k // group, group) - z[..., None]) * s[..., None]).reshape(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K/2], even k in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype):
    """(packed uint8 [N, K/2], scales [N, K/group] in scale_dtype, zeros uint8 [N, K/group])."""
    q, s, z = quantize_int4_codes(w, group, scale_dtype)
    return pack_int4(q), s.to(scale_dtype), z.to(torch.uint8)


class Int4Linear(QuantLinear):
    method = "int4"

    def __init__(
        self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        out_features, half = qweight.shape
        super().__init__(2 * half, out_features, bias)
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight)  # uint8 [N, K/2]
        self.register_buffer("scales", scales)  # [N, K/group], model dtype
        self.register_buffer("zeros", zeros)  # uint8 [N, K/group]
        self.tinygemm = False
        self.mma = False  # codes repacked for the tensor-core kernel (to_mma_, int4_mma.py)
        self._workspace = None  # the Triton matvec's split-K buffers, made on first use (kernels.py)
        self._mma_workspace = None  # the same for the tensor-core kernel (int4_mma.MmaWorkspace)

    @classmethod
    def from_float(cls, linear: nn.Linear, group: int) -> "Int4Linear":
        w = linear.weight.data
        g = effective_group(w.shape[1], group)
        q, s, z = quantize_int4(w, g, w.dtype)
        bias = None if linear.bias is None else linear.bias.data.clone()
        return cls(q, s, z, bias)

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, has_bias: bool, group: int, dtype: torch.dtype, device
    ) -> "Int4Linear":
        g = effective_group(in_features, group)
        bias = torch.empty(out_features, dtype=dtype, device=device) if has_bias else None
        return cls(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
            torch.empty(out_features, in_features // g, dtype=dtype, device=device),
            torch.empty(out_features, in_features // g, dtype=torch.uint8, device=device),
            bias,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.tinygemm:
            raise RuntimeError("an Int4Linear in tinygemm form cannot be dequantized")
        n, k, g = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self._stored_codes()).reshape(n, k // g, g)
        if dtype == torch.float32:
            w = (q.float() - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        else:  # integers up to 15 are exact in any float type: only the product rounds
            w = (q.to(dtype) - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]
        return w.reshape(n, k)

    def _stored_codes(self) -> torch.Tensor:
        """The codes as uint8 [N, K/2] in the checkpoint's layout (even k low), whatever the form."""
        if self.mma:
            from engine.quant.int4_mma import unpack_mma

            return unpack_mma(self.mma_qweight, self.group_size)
        return self.qweight

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        if self.tinygemm:
            y = torch.ops.aten._weight_int4pack_mm(
                x.to(torch.bfloat16), self.tg_weight, self.group_size, self.tg_scales_zeros
            ).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.mma:
            return self._forward_mma(x)
        g = self.group_size
        if x.shape[0] > KERNEL_MAX_ROWS or g < 32 or g & (g - 1):
            return self.forward_reference(x)
        from engine.quant import kernels

        workspace = self.matvec_workspace() if x.shape[0] == 1 else None
        return kernels.quant_matmul(
            x, kernels.FMT_INT4, self.qweight, self.scales, self.zeros, bias=self.bias, group=g, workspace=workspace
        )

    def matvec_workspace(self):
        """The Triton matvec's split-K buffers (kernels.Int4Workspace) on the weights' device.

        Made at load (swap.set_backend_, so the KV cache sizing sees it) or else by the first
        decode step, before any CUDA graph capture; then reused: its counters must outlive
        every call, as they do in a replayed graph."""
        from engine.quant import kernels

        ws = self._workspace
        if ws is None or ws.partials.device != self.qweight.device:
            ws = self._workspace = kernels.Int4Workspace.for_rows(self.out_features, self.qweight.device)
        return ws

    # ----- our tensor-core kernel (int4_mma.py), a runtime-only form ---------------------

    def mma_supported(self) -> bool:
        """bf16 / fp16 models (the tensor cores' operand types; fp32 stays on the matvec, exact in fp32)."""
        from engine.quant.int4_mma import OFFSET, SUPPORTED_GROUPS

        return (
            self.qweight is not None
            and self.qweight.is_cuda
            and self.group_size in SUPPORTED_GROUPS
            and self.scales.dtype in OFFSET
        )

    @torch.no_grad()
    def to_mma_(self, rows_per_chunk: int = 8192) -> None:
        """Repacks the codes for int4_mma's kernel (a permutation of the nibbles within each group:
        same bytes) and frees the checkpoint layout. dequantize() still works (it unpacks), but
        the state_dict now holds mma_qweight, not qweight: do not save the layer afterwards.
        Rows go a chunk at a time, so the repacking's temporaries stay small (lm_head)."""
        from engine.quant.int4_mma import pack_mma

        if self.tinygemm or self.mma:
            raise RuntimeError(f"this Int4Linear is already repacked ({self.extra_repr()})")
        words = torch.empty(self.out_features, self.in_features // 8, dtype=torch.int32, device=self.qweight.device)
        for r in range(0, self.out_features, rows_per_chunk):
            words[r : r + rows_per_chunk] = pack_mma(self.qweight[r : r + rows_per_chunk], self.group_size)
        self.qweight = None
        self.register_buffer("mma_qweight", words)
        self.mma = True

    def mma_workspace(self):
        """int4_mma.MmaWorkspace on the weights' device: made at load (swap.set_backend_), before
        any CUDA graph capture, then reused, as matvec_workspace."""
        from engine.quant.int4_mma import MmaWorkspace

        ws = self._mma_workspace
        if ws is None or ws.partials.device != self.mma_qweight.device:
            ws = self._mma_workspace = MmaWorkspace.for_rows(self.out_features, self.mma_qweight.device)
        return ws

    def _forward_mma(self, x: torch.Tensor) -> torch.Tensor:
        from engine.quant.int4_mma import OFFSET, int4_mma_matmul

        if x.shape[0] > KERNEL_MAX_ROWS or x.dtype not in OFFSET:
            return self.forward_reference(x)
        return int4_mma_matmul(x, self.mma_qweight, self.scales, self.zeros, self.bias, self.group_size, self.mma_workspace())

    def folds_residual(self, x: torch.Tensor) -> bool:
        from engine.quant.int4_mma import NORM_SLOT_ROWS

        return self._mma_one_row(x) and self.out_features % NORM_SLOT_ROWS == 0

    def folds_norm(self, x: torch.Tensor) -> bool:
        from engine.quant.int4_mma import NORM_SLOT_ROWS

        return self._mma_one_row(x) and self.in_features % NORM_SLOT_ROWS == 0

    def _mma_one_row(self, x: torch.Tensor) -> bool:
        from engine.quant.int4_mma import OFFSET

        return self.mma and x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in OFFSET and x.dtype == self.scales.dtype

    def forward_add_residual(
        self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s = x W^T + residual, s * norm_weight, s's sums of squares per NORM_SLOT_ROWS values),
        in the mma kernel's epilogue (folds_residual(x) must hold): the next RMSNorm less its 1 / RMS,
        which forward_normed of the projection after it applies."""
        from engine.quant.int4_mma import int4_mma_matmul

        ws = self.mma_workspace()
        summed, weighted = int4_mma_matmul(
            x, self.mma_qweight, self.scales, self.zeros, self.bias, self.group_size, ws,
            residual=residual, norm_weight=norm_weight,
        )
        return summed, weighted, ws.squares

    def forward_normed(self, weighted: torch.Tensor, squares: torch.Tensor, eps: float, gated: bool) -> torch.Tensor:
        """This layer's output for rmsnorm(s) from forward_add_residual's (s * norm weight, sums of
        squares of s): the product scaled by 1 / RMS(s) in the kernel; gated: then silu(gate) * up."""
        from engine.quant.int4_mma import int4_mma_matmul

        y = int4_mma_matmul(
            weighted, self.mma_qweight, self.scales, self.zeros, self.bias, self.group_size, self.mma_workspace(),
            norm_squares=squares, eps=eps,
        )
        if gated:
            from engine.model.fused_ops import silu_and_mul

            return silu_and_mul(y)
        return y

    # ----- PyTorch's own int4 kernel (tinygemm), a runtime-only form --------------------

    def tinygemm_supported(self) -> bool:
        return (
            self.qweight.is_cuda
            and self.group_size in (32, 64, 128, 256)
            and self.in_features % (TINYGEMM_INNER_K_TILES * 16) == 0
            and self.out_features % 8 == 0
        )

    @torch.no_grad()
    def to_tinygemm_(self) -> None:
        """Repacks for torch's _weight_int4pack_mm (bf16 activations); frees the portable tensors.

        tinygemm dequantizes as (q - 8) * s + t with a float offset t, so t = (8 - z) * s
        (rounded to bf16). The layer keeps no portable copy: do not save it afterwards.
        """
        if not self.tinygemm_supported():
            raise ConfigError(f"tinygemm cannot run this layer ({self.extra_repr()}, group {self.group_size})")
        q = unpack_int4(self.qweight)
        packed = (q[:, 0::2] << 4) | q[:, 1::2]  # tinygemm: even k in the high nibble
        weight = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), TINYGEMM_INNER_K_TILES)
        s = self.scales.float()
        offset = (8.0 - self.zeros.float()) * s
        sz = torch.stack([s, offset], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [G, N, 2]
        self.qweight = self.scales = self.zeros = None
        self.register_buffer("tg_weight", weight)
        self.register_buffer("tg_scales_zeros", sz)
        self.tinygemm = True

    def extra_repr(self) -> str:
        form = ", tinygemm" if self.tinygemm else ", mma" if self.mma else ""
        return super().extra_repr() + f", group_size={self.group_size}" + form
