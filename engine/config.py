"""One validated dataclass per concern; `EngineConfig` holds them all.

The deployments build these from their pydantic models; in a notebook they
are built directly. Every check raises `ConfigError` with a message that
names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.errors import ConfigError

MAX_SCHEDULER_STEPS = 64  # EngineConfig.num_scheduler_steps: past this the extra blocks and the waste only grow
DType = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class CacheConfig:
    """The paged KV cache.

    num_blocks fixes the pool size; otherwise it is sized from
    gpu_memory_utilization on CUDA, or from cpu_kv_cache_bytes on the CPU.
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 256 * 2**20
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"cache.block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ConfigError(f"cache.num_blocks must be >= 2, got {self.num_blocks}")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ConfigError("cache.gpu_memory_utilization must be in [0.05, 0.99]")
        if self.cpu_kv_cache_bytes < 2**20:
            raise ConfigError("cache.cpu_kv_cache_bytes must be at least 1 MiB")


@dataclass
class SchedulerConfig:
    """Per-step limits of the continuous-batching scheduler."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError("scheduler.max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 16:
            raise ConfigError("scheduler.max_num_batched_tokens must be >= 16")


@dataclass
class QuantConfig:
    """Weight quantization, applied as a module swap at load time."""

    method: Literal["none", "int8", "int4", "fp8"] = "none"
    group_size: int = 128  # int4 only
    awq: bool = True  # int4 only: activation-aware scales (False: plain round-to-nearest)
    # CUDA kernels: "triton" (ours, for decode-sized batches), "torch" (PyTorch's own
    # _weight_int4pack_mm for int4 and _scaled_mm for fp8; int8 dequantizes), "triton-mma"
    # (int4 on our tensor-core kernel, engine/quant/int4_mma.py, bf16 / fp16 models; int8 / fp8
    # as "triton"), or "auto": per method, the one engine/quant/swap.py's AUTO_BACKEND names
    # (from bench/quant.py's W3 runs). The CPU ignores it.
    backend: Literal["auto", "triton", "torch", "triton-mma"] = "auto"

    def __post_init__(self) -> None:
        if self.method not in ("none", "int8", "int4", "fp8"):
            raise ConfigError(f"quantization.method must be none|int8|int4|fp8, got {self.method!r}")
        if self.backend not in ("auto", "triton", "torch", "triton-mma"):
            raise ConfigError(f"quantization.backend must be auto|triton|torch|triton-mma, got {self.backend!r}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ConfigError("quantization.group_size must be a power of two >= 16")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: who proposes tokens, and how many per step.

    draft: draft_model runs on the engine's device, sharing its block tables.
    ngram: prompt lookup over each sequence's own tokens (ngram_min..ngram_max).
    remote: proposals from an object given to LLMEngine(proposer=...), e.g. the
    draft deployment's (deployments/draft_server.py); draft_model names the
    model that deployment loads. Requests opt out with use_speculation=False.
    """

    method: Literal["none", "draft", "ngram", "remote"] = "none"
    draft_model: str | None = None
    num_speculative_tokens: int = 4
    ngram_max: int = 4
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("none", "draft", "ngram", "remote"):
            raise ConfigError(f"speculative.method must be none|draft|ngram|remote, got {self.method!r}")
        if self.method == "draft" and not self.draft_model:
            raise ConfigError("speculative.method 'draft' needs speculative.draft_model")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ConfigError("speculative.num_speculative_tokens must be in [1, 16]")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError("speculative.ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class EngineConfig:
    """Everything one engine (one replica, one device) needs.

    model: a local folder with config.json + *.safetensors, a hub id (only
    where a hub is reachable), or "preset:<name>" for random weights.
    """

    model: str
    tokenizer: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    enforce_eager: bool = False  # True: no CUDA graphs
    # Schedule and launch step N+1 before step N's tokens are read back, so the host's work
    # hides behind the device's (LLMEngine._step_async). Same tokens for greedy and seeded
    # requests. With the co-located draft it chains speculative steps on the device
    # (engine/spec/chain.py); other proposers step synchronously, needing each step's tokens.
    # "auto": on for CUDA, where it took W1 from 12.7k to 23.7k tok/s on an H100; off on the
    # CPU, where the "device" is the host itself and there is nothing to overlap.
    async_scheduling: bool | Literal["auto"] = "auto"
    # Steps of up to 64 tokens on CUDA run each RMSNorm inside the projection after it, and
    # SiLU-and-mul inside gate_up's (engine/model/norm_linear.py): three kernels fewer per layer,
    # for bf16 / fp16 layers small enough that such a step is bound by its launches (up to
    # fused_ops.NORM_LINEAR_MAX_WEIGHT weights; bigger ones keep cuBLAS). "auto": in the speculative
    # passes only (the draft's, the target's verify), where it is measured faster: on the H200 the
    # demo pair's chained draft:2 went from 4,309 to 4,855 tok/s at batch 1. Plain decoding measured
    # 3-20% slower with it in W4's timed runs, so it stays off there (BENCHMARKS.md, W4).
    fused_norm_linear: bool | Literal["auto"] = "auto"
    # Decode passes of up to 8 tokens on CUDA rotate the new tokens and write their K/V inside the
    # decode attention kernel (no rope_and_cache kernel: Attention.decode_rope), and int4 layers in
    # the tensor-core form fold each residual add and RMSNorm into the products either side at one
    # token (fused_ops.fold_add_norm): on the 8B model at batch 1, 32 + 63 kernels fewer a step. Its
    # int4 decode graph took 2.504 ms against 2.660 unfolded on an H100, same process, same kernel
    # configs (bench/decode_graph_ab.py; the rotary fold alone 2.592). Correct on the H100
    # (bench/engine_check.py against Hugging Face, W3's int4 tokens) and under the Triton interpreter
    # (tests/engine/model/test_fold_norms.py). False: every add, norm and rotary in its own kernel.
    decode_folds: bool = True
    # Decode steps per launch (vLLM's --num-scheduler-steps), with async scheduling and no
    # speculation: a launched step is followed on the device by num_scheduler_steps - 1 decode
    # passes of the rows it sampled, each fed the last one's tokens, and the host reads all of them
    # back at once (LLMEngine._launch_more). With a small model a step is the host's Python, not
    # the GPU's work; this runs that Python once per k tokens. Costs: tokens stream in groups of
    # up to k; a request that stops early computed up to 2k - 1 rows for nothing; its first token
    # comes k - 1 decode passes later. 1: one step per launch.
    num_scheduler_steps: int = 1
    # The CPU the engine core's process runs on when it has one (engine/core_process.py), None: any.
    # A serving replica picks it from the node's plan (engine/cpu_affinity.py).
    core_cpu: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model must name a folder, a hub id or preset:<name>")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be >= 1")
        if self.async_scheduling not in (True, False, "auto"):
            raise ConfigError(f"async_scheduling must be true, false or auto, got {self.async_scheduling!r}")
        if self.fused_norm_linear not in (True, False, "auto"):
            raise ConfigError(f"fused_norm_linear must be true, false or auto, got {self.fused_norm_linear!r}")
        if not isinstance(self.decode_folds, bool):
            raise ConfigError(f"decode_folds must be true or false, got {self.decode_folds!r}")
        if isinstance(self.num_scheduler_steps, bool) or not isinstance(self.num_scheduler_steps, int) \
                or not 1 <= self.num_scheduler_steps <= MAX_SCHEDULER_STEPS:
            raise ConfigError(f"num_scheduler_steps must be an integer in [1, {MAX_SCHEDULER_STEPS}], got {self.num_scheduler_steps!r}")
        if self.core_cpu is not None and self.core_cpu < 0:
            raise ConfigError(f"core_cpu must be a CPU number >= 0 or null, got {self.core_cpu}")
