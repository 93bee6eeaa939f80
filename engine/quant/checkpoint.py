"""Quantized checkpoints: our model's quantized tensors in safetensors, the scheme in config.json.

config.json is the source model's, plus

    "quantization_config": {"quant_method": "rayllm-serve", "format_version": 1,
                            "method": "int4", "group_size": 128, "awq": true}

The scheme lives there and nowhere else (never in a file name). Tensors are
named as in our model (`layers.0.self_attn.qkv_proj.qweight`, ...), with
AWQ's scales already folded into the norm weights, so loading is a plain
copy: no calibration, no rounding, bit for bit what the converter held.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.config import QuantConfig
from engine.errors import ConfigError

FORMAT = "rayllm-serve"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# Files copied from the source folder as they are: tokenizer, generation defaults, model card.
SIDE_FILES = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.model", "vocab*", "merges.txt")


def quantization_config_json(config: QuantConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"quant_method": FORMAT, "format_version": FORMAT_VERSION, "method": config.method}
    if config.method == "int4":
        out.update(group_size=config.group_size, awq=config.awq)
    return out


def read_quantization_config(hf_config: dict[str, Any], path: Path) -> QuantConfig | None:
    """The scheme of a quantized checkpoint, None for a float one; ConfigError for a foreign format."""
    q = hf_config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != FORMAT:
        kind = q.get("quant_method") if isinstance(q, dict) else q
        raise ConfigError(
            f"{path} is quantized in a format this engine does not read (quant_method {kind!r}); "
            "give it the float (bf16) checkpoint and a quantization mode, or convert that checkpoint "
            "with `python -m engine.quant.convert`"
        )
    if q.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: quantized checkpoint format_version {q.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    if q.get("method") not in ("int8", "int4", "fp8"):
        raise ConfigError(f"{path}: quantization_config.method {q.get('method')!r} is not int8, int4 or fp8")
    return QuantConfig(method=q["method"], group_size=int(q.get("group_size", 128)), awq=bool(q.get("awq", False)))


def describe(config: QuantConfig) -> str:
    if config.method == "int4":
        return f"int4 (group_size {config.group_size}, awq {str(config.awq).lower()})"
    return config.method


def check_matches(checkpoint: QuantConfig, wanted: QuantConfig, path: str | Path | None = None) -> None:
    """ConfigError unless the engine's quantization settings are those the checkpoint was made with."""
    same = checkpoint.method == wanted.method
    if same and wanted.method == "int4":
        same = checkpoint.group_size == wanted.group_size and checkpoint.awq == wanted.awq
    if not same:
        where = f"checkpoint {path}" if path else "the checkpoint"
        raise ConfigError(
            f"{where} is quantized as {describe(checkpoint)} but the config asks for quantization "
            f"{describe(wanted)}; set quantization to match the checkpoint (its config.json "
            "quantization_config), or load the float checkpoint to quantize it at load time"
        )


def save_quantized(
    model: nn.Module, hf_config: dict[str, Any], config: QuantConfig, out: Path, dtype: torch.dtype,
    source: Path | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = dict(hf_config)
    cfg["quantization_config"] = quantization_config_json(config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if source is not None:
        for pattern in SIDE_FILES:
            for f in source.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, out / f.name)
    return out


@torch.no_grad()
def load_quantized_(net: nn.Module, path: Path) -> None:
    """Copies every tensor of a quantized checkpoint into the matching (empty) tensor of `net`."""
    from engine.model.loader import checkpoint_files

    targets = net.state_dict()
    loaded: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in targets:
                    raise ConfigError(f"quantized checkpoint tensor {name} has no place in the model ({path})")
                t = f.get_tensor(name)
                target = targets[name]
                if tuple(t.shape) != tuple(target.shape):
                    raise ConfigError(
                        f"quantized checkpoint tensor {name} has shape {tuple(t.shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                if t.dtype != target.dtype and not (_plain_float(t.dtype) and _plain_float(target.dtype)):
                    raise ConfigError(f"quantized checkpoint tensor {name} is {t.dtype}, expected {target.dtype}")
                target.copy_(t.to(dtype=target.dtype))
                loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ConfigError(f"quantized checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _plain_float(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16)
