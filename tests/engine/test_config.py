"""Engine configuration dataclasses: every impossible value is a ConfigError naming its field."""

from __future__ import annotations

import pytest

from engine import CacheConfig, ConfigError, EngineConfig, QuantConfig, SchedulerConfig, SpeculativeConfig


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CacheConfig(block_size=0), "block_size"),
        (lambda: CacheConfig(block_size=12), "block_size"),
        (lambda: CacheConfig(num_blocks=1), "num_blocks"),
        (lambda: CacheConfig(gpu_memory_utilization=1.0), "gpu_memory_utilization"),
        (lambda: CacheConfig(cpu_kv_cache_bytes=1000), "cpu_kv_cache_bytes"),
        (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs"),
        (lambda: SchedulerConfig(max_num_batched_tokens=8), "max_num_batched_tokens"),
        (lambda: QuantConfig(method="int3"), "quantization.method"),
        (lambda: QuantConfig(group_size=100), "group_size"),
        (lambda: SpeculativeConfig(method="magic"), "speculative.method"),
        (lambda: SpeculativeConfig(method="draft"), "draft_model"),
        (lambda: SpeculativeConfig(num_speculative_tokens=0), "num_speculative_tokens"),
        (lambda: SpeculativeConfig(num_speculative_tokens=17), "num_speculative_tokens"),
        (lambda: EngineConfig(model=""), "model"),
        (lambda: EngineConfig(model="preset:tiny-llama", dtype="int8"), "dtype"),
        (lambda: EngineConfig(model="preset:tiny-llama", max_model_len=0), "max_model_len"),
        (lambda: EngineConfig(model="preset:tiny-llama", async_scheduling="yes"), "async_scheduling"),
        (lambda: EngineConfig(model="preset:tiny-llama", fused_norm_linear="yes"), "fused_norm_linear"),
    ],
)
def test_bad_values_raise_config_error(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_good_values_are_kept():
    cfg = EngineConfig(
        model="preset:tiny-llama",
        cache=CacheConfig(block_size=32, num_blocks=2, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, enable_chunked_prefill=False),
        speculative=SpeculativeConfig(method="draft", draft_model="preset:tiny-llama", num_speculative_tokens=16),
    )
    assert cfg.cache.block_size == 32 and cfg.speculative.enabled
    assert not SpeculativeConfig().enabled


def test_engine_on_a_preset_sizes_its_cache_from_cpu_bytes():
    from engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(model="preset:tiny-llama", device="cpu", cache=CacheConfig(block_size=16, cpu_kv_cache_bytes=2**20))
    )
    # K and V of 2 layers x 2 kv heads x 16 dims x 4 bytes x 16 tokens = 8 KiB a block.
    assert engine.kv_cache.shape[2] == 2**20 // (2 * 2 * 2 * 16 * 4 * 16) == 128
    assert engine.max_model_len == min(1024, 127 * 16)
    assert engine.tokenizer is None and engine.eos_token_ids == {2}
    # async_scheduling "auto" overlaps host and device only where they are two things (CUDA).
    assert engine.config.async_scheduling == "auto" and engine.async_scheduling is False
