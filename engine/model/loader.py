"""Hugging Face config + safetensors -> our LlamaForCausalLM, on any device and dtype.

A user's checkpoint, the bundled demo models and the test presets written by
`save_hf_checkpoint` all come through `load_model`; only "preset:<name>"
skips the files and draws random weights directly on the device.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import QuantConfig
from engine.errors import ConfigError
from engine.model.arch import ModelArch
from engine.model.llama import LlamaForCausalLM, Rotary
from engine.model.presets import preset_config

PRESET_PREFIX = "preset:"

# HF parameter name -> (our name, index of the piece within a fused tensor, piece count)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0, 3),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1, 3),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2, 3),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0, 2),
    "mlp.up_proj": ("mlp.gate_up_proj", 1, 2),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    arch: ModelArch
    path: Path | None  # the checkpoint folder; None for a preset
    quantization: QuantConfig | None = None  # the scheme of a checkpoint quantized offline (engine.quant)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available")
    return dev


def resolve_model_path(model: str) -> Path:
    """A local folder as it is; otherwise a hub id, fetched only where a hub is reachable."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        )
    except Exception as exc:  # the hub's errors vary by version; the message is what matters
        raise ConfigError(f"model {model!r} is neither a local folder nor a reachable hub id: {exc}") from exc


def load_model(model: str, dtype: str = "auto", device: str = "auto", seed: int = 0) -> LoadedModel:
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if model.startswith(PRESET_PREFIX):
        arch = ModelArch.from_hf_config(preset_config(model[len(PRESET_PREFIX) :]))
        net = _empty_model(arch, dev, torch_dtype)
        random_init_(net, seed)
        return LoadedModel(net, arch, None)
    path = resolve_model_path(model)
    hf_config = json.loads((path / "config.json").read_text())
    arch = ModelArch.from_hf_config(hf_config)
    if "quantization_config" in hf_config:
        # Written by `python -m engine.quant.convert`: quantized modules, filled as they are.
        from engine.quant.checkpoint import load_quantized_, read_quantization_config
        from engine.quant.swap import build_empty_quantized_

        quant = read_quantization_config(hf_config, path)
        net = _empty_model(arch, dev, torch_dtype, lambda n: build_empty_quantized_(n, quant, torch_dtype))
        load_quantized_(net, path)
        return LoadedModel(net, arch, path, quant)
    net = _empty_model(arch, dev, torch_dtype)
    load_safetensors_(net, path)
    return LoadedModel(net, arch, path)


def _empty_model(
    arch: ModelArch,
    device: torch.device,
    dtype: torch.dtype,
    prepare: Callable[[LlamaForCausalLM], None] | None = None,
) -> LlamaForCausalLM:
    # Build on the meta device so that no memory is touched twice, then place it; `prepare`
    # may swap modules while still on meta (quantized ones keep their own dtypes).
    with torch.device("meta"):
        net = LlamaForCausalLM(arch).to(dtype)
        if prepare is not None:
            prepare(net)
    net = net.to_empty(device=device)
    net.rotary = Rotary(arch, arch.max_position_embeddings).to(device)
    for module in net.modules():
        if module.__class__.__name__ == "RMSNorm":
            module.weight.data.fill_(1.0)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def random_init_(net: LlamaForCausalLM, seed: int, std: float = 0.02) -> None:
    """Random weights from `seed`, drawn on the model's own device."""
    gen = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
    for name, param in net.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=gen)


def checkpoint_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} holds no *.safetensors files")
    return files


@torch.no_grad()
def load_safetensors_(net: LlamaForCausalLM, path: Path) -> None:
    params = dict(net.named_parameters())
    loaded: set[str] = set()
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                target = _our_name(hf_name)
                if target is None:
                    continue
                name, index, count = target
                if name not in params:
                    if name == "lm_head.weight" and net.lm_head is None:
                        continue  # tied: the checkpoint may carry a copy of the embedding
                    raise ConfigError(f"checkpoint tensor {hf_name} has no place in the model")
                tensor = f.get_tensor(hf_name)
                if count == 1:
                    _copy(params[name], tensor, hf_name)
                    loaded.add(name)
                    continue
                pieces.setdefault(name, {})[index] = tensor
                if len(pieces[name]) == count:
                    by_index = pieces.pop(name)
                    parts = [by_index[i] for i in range(count)]
                    if len({tuple(t.shape[1:]) for t in parts}) != 1:
                        shapes = [tuple(t.shape) for t in parts]
                        raise ConfigError(f"checkpoint tensors fused into {name} have mismatched shapes {shapes}")
                    fused = torch.cat(parts, dim=0)
                    _copy(params[name], fused, name)
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _our_name(hf_name: str) -> tuple[str, int, int] | None:
    if hf_name == "model.embed_tokens.weight":
        return "embed_tokens.weight", 0, 1
    if hf_name == "model.norm.weight":
        return "norm.weight", 0, 1
    if hf_name == "lm_head.weight":
        return "lm_head.weight", 0, 1
    m = _LAYER_RE.match(hf_name)
    if m is None:
        return None  # e.g. rotary inv_freq buffers that some checkpoints carry
    layer, module, kind = m.groups()
    if module in _FUSED:
        ours, index, count = _FUSED[module]
        return f"layers.{layer}.{ours}.{kind}", index, count
    return f"layers.{layer}.{module}.{kind}", 0, 1


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ConfigError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.copy_(tensor.to(device=param.device, dtype=param.dtype))
