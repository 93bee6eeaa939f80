"""Named model shapes: tiny ones for tests, real ones for benchmarks.

Each preset is a Hugging Face config dict, so a preset goes through the same
`ModelArch.from_hf_config` as a real checkpoint. `save_hf_checkpoint` writes a
preset with random weights as a real checkpoint folder (transformers'
own model class, safetensors), which our loader and HF then both read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import ConfigError


def _tiny(model_type: str, **extra: Any) -> dict[str, Any]:
    cfg = {
        "model_type": model_type,
        "architectures": [_ARCH_CLASS[model_type]],
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(extra)
    return cfg


_ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": _tiny("llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "tiny-qwen2": _tiny("qwen2", tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "tiny-qwen3": _tiny("qwen3", num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "tiny-mistral": _tiny("mistral", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "llama3-8b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])


def save_hf_checkpoint(
    name_or_config: str | dict[str, Any],
    folder: str | Path,
    seed: int = 0,
    dtype: str = "float32",
    initializer_range: float = 0.02,
) -> Path:
    """Builds the preset with transformers' own model class, random weights from `seed`, and saves it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = preset_config(name_or_config) if isinstance(name_or_config, str) else dict(name_or_config)
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, initializer_range=initializer_range, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
