"""Activation-aware scales for int4 (AWQ, Lin et al. 2023), searched on calibration activations.

A few input channels carry much larger activations than the rest, and the
error of their weights counts for more. Scaling input channel k of a layer's
weight by s[k] > 1 before quantizing (and its input by 1 / s[k]) gives those
weights finer steps at the expense of the others; the product is unchanged
in exact arithmetic:  x W^T = (x / s) (W s)^T.

Per layer, s = mean|x|^alpha (normalized to a geometric mean of about 1),
with alpha in {0, 1/20, ..., 19/20} chosen to minimize the mean squared
output error of the int4-quantized layer on the calibration inputs (for
gate_up_proj, of the whole MLP: silu(gate) * up through a float down_proj,
since an error in a gate that silu flattens costs little). alpha = 0 is
plain round-to-nearest, so the search never does worse on them.

Then, as AWQ does, the range of each group is clipped: the largest |w| of a
group shrinks by a ratio in {1, 0.975, ..., 0.525} chosen per group to
minimize that group's output error (a rare large weight otherwise stretches
the 16 levels of its whole group). Not for the q and k rows, whose errors
the softmax amplifies.

Where does 1 / s go? Folded into the operation that produces the layer's
input, so that inference pays nothing:
  qkv_proj, gate_up_proj, lm_head  <- the RMSNorm weight before them
  down_proj                        <- the `up` rows of gate_up_proj (silu(gate) * up is linear in up)
  o_proj                           <- the `v` rows of qkv_proj (attention output is linear in v);
                                      with grouped-query attention one v channel feeds every query
                                      head of its group, so o_proj's scales are tied across the
                                      group: searched on mean|x| pooled over those heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant.int4 import effective_group, fake_quantize_int4

AWQ_GRID = 20
LOSS_ROWS = 512  # calibration tokens the losses are measured on (mean|x| uses all of them)


@dataclass
class AwqResult:
    layer: str
    alpha: float
    rtn_error: float  # mean squared output error with s = 1 (round-to-nearest)
    awq_error: float  # ... with the chosen s


@torch.no_grad()
def search_scale(
    weight: torch.Tensor,  # [N, K]
    x: torch.Tensor,  # [T, K] calibration inputs of this layer
    group: int,
    scale_dtype: torch.dtype,
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
    expand: Callable[[torch.Tensor], torch.Tensor] | None = None,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grid: int = AWQ_GRID,
    loss_rows: int = LOSS_ROWS,
) -> tuple[torch.Tensor, float, float, float]:
    """(s [K] fp32, alpha, rtn_error, awq_error) minimizing ||post(x W^T) - post(x (Q(W s) / s)^T)||^2.

    pool/expand tie channels together (o_proj under grouped-query attention);
    post maps the layer's output to where the error is measured.
    """
    w = weight.float()
    g = effective_group(w.shape[1], group)
    x_mean = x.float().abs().mean(dim=0)  # statistics over every calibration token
    if pool is not None:
        x_mean = pool(x_mean)
    xs = _rows(x, loss_rows).float()  # the loss over an even subsample of them
    post = post or (lambda y: y)
    ref = post(xs @ w.t())
    best = (math.inf, None, 0.0)
    rtn_err = math.inf
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if expand is not None:
            s = expand(s)
        wq = fake_quantize_int4(w * s, g, scale_dtype) / s
        err = (post(xs @ wq.t()) - ref).pow(2).mean().item()
        if i == 0:
            rtn_err = err
        if err < best[0]:
            best = (err, s, alpha)
    err, s, alpha = best
    return s, alpha, rtn_err, err


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,  # [N, K], already scaled
    x: torch.Tensor,  # [T, K], inputs as the scaled layer sees them
    group: int,
    scale_dtype: torch.dtype,
    grid: int = AWQ_GRID,
    max_shrink: float = 0.5,
    loss_rows: int = LOSS_ROWS,
    row_chunk: int = 1024,
) -> torch.Tensor:
    """Per (row, group) clip value max|w| * r, r chosen to minimize the group's output error: [N, K/group]."""
    w = weight.float()
    n, k = w.shape
    g = effective_group(k, group)
    xg = _rows(x, loss_rows).float().reshape(-1, k // g, g)  # [T, NG, G]
    best_max = torch.empty(n, k // g, device=w.device)
    for r0 in range(0, n, row_chunk):
        wg = w[r0 : r0 + row_chunk].reshape(-1, k // g, g)  # [n, NG, G]
        org_max = wg.abs().amax(dim=-1)  # [n, NG]
        best_err = torch.full_like(org_max, math.inf)
        chunk_best = org_max.clone()
        for i in range(int(max_shrink * grid)):
            cur = org_max * (1 - i / grid)
            wc = torch.maximum(torch.minimum(wg, cur[..., None]), -cur[..., None])
            dw = (wg - fake_quantize_int4(wc.reshape(-1, k), g, scale_dtype).reshape_as(wg))
            err = torch.einsum("tgj,ngj->tng", xg, dw).pow(2).mean(dim=0)  # [n, NG]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chunk_best = torch.where(better, cur, chunk_best)
        best_max[r0 : r0 + row_chunk] = chunk_best
    return best_max


def _rows(x: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` rows of x, evenly spaced (deterministic)."""
    if x.shape[0] <= count:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, count, device=x.device).long()]


@torch.no_grad()
def apply_awq_(
    model: nn.Module, inputs: dict[str, torch.Tensor], group: int, grid: int = AWQ_GRID, clip: bool = True
) -> list[AwqResult]:
    """Searches scales and clips for every decoder layer and lm_head of `model` (float), folds them in.

    `inputs` are the calibration inputs of each nn.Linear by name
    (calibration.capture_linear_inputs), taken before any scaling. The model
    stays float and computes the same function (up to rounding); quantizing
    it afterwards (round-to-nearest) gives the AWQ model.
    """
    arch = model.arch
    results: list[AwqResult] = []
    dtype = next(model.parameters()).dtype
    q_size = arch.num_heads * arch.head_dim
    kv_size = arch.num_kv_heads * arch.head_dim
    heads_per_kv = arch.num_heads // arch.num_kv_heads
    inter = arch.intermediate_size
    v_rows = slice(q_size + kv_size, q_size + 2 * kv_size)
    up_rows = slice(inter, 2 * inter)

    def pool_heads(m: torch.Tensor) -> torch.Tensor:  # o_proj input [H * D] -> per v channel [KVH * D]
        return m.view(arch.num_kv_heads, heads_per_kv, arch.head_dim).mean(dim=1).reshape(-1)

    def expand_heads(s: torch.Tensor) -> torch.Tensor:  # [KVH * D] -> [H * D]
        kv = s.view(arch.num_kv_heads, 1, arch.head_dim)
        return kv.expand(arch.num_kv_heads, heads_per_kv, arch.head_dim).reshape(-1)

    def search(name: str, linear: nn.Linear, **kw) -> torch.Tensor:
        s, alpha, rtn, awq = search_scale(linear.weight, inputs[name], group, dtype, grid=grid, **kw)
        results.append(AwqResult(name, alpha, rtn, awq))
        return s

    def clip_(name: str, linear: nn.Linear, s: torch.Tensor, rows: slice = slice(None)) -> None:
        if clip:
            w = linear.weight[rows]
            max_val = search_clip(w, inputs[name] / s.to(inputs[name].dtype), group, dtype, grid=grid)
            g = w.shape[1] // max_val.shape[1]
            m = max_val.repeat_interleave(g, dim=1)
            w.copy_(torch.maximum(torch.minimum(w.float(), m), -m).to(w.dtype))

    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        kinds = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
        names = [f"layers.{i}.{kind}" for kind in kinds]
        down_w = mlp.down_proj.weight.float()

        def mlp_out(y: torch.Tensor) -> torch.Tensor:  # gate_up output -> MLP output (float down_proj)
            return (F.silu(y[:, :inter]) * y[:, inter:]) @ down_w.t()

        # Search all four on the original weights (as AWQ does), then fold.
        s_qkv = search(names[0], attn.qkv_proj)
        s_o = search(names[1], attn.o_proj, pool=pool_heads, expand=expand_heads)
        s_gu = search(names[2], mlp.gate_up_proj, post=mlp_out)
        s_down = search(names[3], mlp.down_proj)

        _scale_columns_(attn.qkv_proj, s_qkv)
        _divide_(layer.input_layernorm.weight, s_qkv)
        _scale_columns_(attn.o_proj, s_o)
        s_v = s_o.view(arch.num_kv_heads, heads_per_kv, arch.head_dim)[:, 0].reshape(-1)  # equal across a group
        _divide_(attn.qkv_proj.weight[v_rows], s_v[:, None])
        if attn.qkv_proj.bias is not None:
            _divide_(attn.qkv_proj.bias[v_rows], s_v)
        _scale_columns_(mlp.gate_up_proj, s_gu)
        _divide_(layer.post_attention_layernorm.weight, s_gu)
        _scale_columns_(mlp.down_proj, s_down)
        _divide_(mlp.gate_up_proj.weight[up_rows], s_down[:, None])

        clip_(names[0], attn.qkv_proj, s_qkv, v_rows)
        clip_(names[1], attn.o_proj, s_o)
        clip_(names[2], mlp.gate_up_proj, s_gu)
        clip_(names[3], mlp.down_proj, s_down)

    if getattr(model, "lm_head", None) is not None and "lm_head" in inputs:
        s_head = search("lm_head", model.lm_head)
        _scale_columns_(model.lm_head, s_head)
        _divide_(model.norm.weight, s_head)
        clip_("lm_head", model.lm_head, s_head)
    return results


def _scale_columns_(linear: nn.Linear, s: torch.Tensor) -> None:
    w = linear.weight
    w.copy_((w.float() * s[None, :]).to(w.dtype))


def _divide_(t: torch.Tensor, s: torch.Tensor) -> None:
    t.copy_((t.float() / s).to(t.dtype))
