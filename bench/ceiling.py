"""The hardware ceiling of an offline decode run, from measured bandwidth and matmul rate.

Decode is bound by memory bandwidth: each step reads every weight once and
the KV cache of every live sequence. Prefill is bound by arithmetic. The sum
of the two floors is the fastest the run could possibly go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.arch import ModelArch


@dataclass(frozen=True)
class DeviceRates:
    bandwidth_bytes_per_s: float  # device-to-device copy, bytes read + written
    matmul_flops_per_s: float  # large bf16 matrix product


def measure_device_rates(device: torch.device) -> DeviceRates:
    if device.type != "cuda":
        return DeviceRates(50e9, 1e11)  # rough CPU figures; the ceiling means little there
    n = 1 << 30  # 1 GiB each way
    src = torch.randn(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_cuda_time(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_s = _median_cuda_time(lambda: a @ b)
    return DeviceRates(2 * n / copy_s, 2 * 8192**3 / mm_s)


def _median_cuda_time(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def offline_floor_seconds(
    arch: ModelArch, n_weight_bytes: int, n_params: int, prompt_lens: list[int], output_len: int, rates: DeviceRates
) -> float:
    """Lower bound on the wall time of the run: decode bytes / bandwidth + prefill flops / matmul rate."""
    kv_per_token = arch.kv_bytes_per_token
    # Step j (0-based) of decode reads the KV of every sequence's prompt plus j generated tokens.
    kv_bytes = sum(kv_per_token * (sum(prompt_lens) + j * len(prompt_lens)) for j in range(output_len))
    decode_bytes = output_len * n_weight_bytes + kv_bytes
    prefill_flops = 2 * n_params * sum(prompt_lens)
    return decode_bytes / rates.bandwidth_bytes_per_s + prefill_flops / rates.matmul_flops_per_s
