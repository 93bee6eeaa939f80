"""Checkpoint loading: what loads (sharded, tied, extra buffers, dtypes) and clear ConfigErrors for what cannot."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import CacheConfig, ConfigError, EngineConfig, LLMEngine
from engine.model.loader import load_model


@pytest.fixture
def ckpt(llama_ckpt, tmp_path):
    """A private copy of the tiny Llama checkpoint, free to break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(llama_ckpt, folder)
    return folder


def tensors_of(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rewrite(folder, tensors, files: int = 1):
    for f in folder.glob("*.safetensors"):
        f.unlink()
    for f in folder.glob("*.safetensors.index.json"):
        f.unlink()
    names = sorted(tensors)
    for i in range(files):
        part = {n: tensors[n].contiguous() for n in names[i::files]}
        save_file(part, folder / f"model-{i:05d}-of-{files:05d}.safetensors", metadata={"format": "pt"})


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def params_of(model):
    return {k: v.clone() for k, v in model.named_parameters()}


def test_loads_every_tensor_of_the_checkpoint(ckpt):
    loaded = load_model(str(ckpt), "float32", "cpu")
    assert loaded.path == ckpt
    hf = tensors_of(ckpt)
    p = dict(loaded.model.named_parameters())
    qkv = p["layers.1.self_attn.qkv_proj.weight"]
    fused = torch.cat([hf[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(qkv, fused)
    gate_up = torch.cat([hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]])
    assert torch.equal(p["layers.0.mlp.gate_up_proj.weight"], gate_up)
    assert torch.equal(p["embed_tokens.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(p["lm_head.weight"], hf["lm_head.weight"])


def test_sharded_checkpoint_with_fused_pieces_in_different_files(ckpt):
    want = params_of(load_model(str(ckpt), "float32", "cpu").model)
    rewrite(ckpt, tensors_of(ckpt), files=3)  # q, k and v of a layer land in different files
    got = params_of(load_model(str(ckpt), "float32", "cpu").model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_extra_rotary_buffers_are_ignored_and_tied_copies_accepted(tiny_checkpoint, tmp_path):
    folder = tmp_path / "qwen2"
    shutil.copytree(tiny_checkpoint("tiny-qwen2"), folder)
    tensors = tensors_of(folder)
    want = params_of(load_model(str(folder), "float32", "cpu").model)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # tied: a redundant copy
    rewrite(folder, tensors)
    got = params_of(load_model(str(folder), "float32", "cpu").model)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bfloat16_load(ckpt):
    model = load_model(str(ckpt), "bfloat16", "cpu").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hf = tensors_of(ckpt)
    assert torch.equal(model.embed_tokens.weight, hf["model.embed_tokens.weight"].to(torch.bfloat16))


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_model(str(ckpt), "float32", "cpu")


def test_no_safetensors(ckpt):
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match="safetensors"):
        load_model(str(ckpt), "float32", "cpu")


def test_missing_tensor_is_named(ckpt):
    tensors = tensors_of(ckpt)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    rewrite(ckpt, tensors)
    with pytest.raises(ConfigError, match=r"lacks 1 tensors.*layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(ckpt), "float32", "cpu")


def test_missing_piece_of_a_fused_tensor_is_named(ckpt):
    tensors = tensors_of(ckpt)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    rewrite(ckpt, tensors)
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.qkv_proj\.weight"):
        load_model(str(ckpt), "float32", "cpu")


def test_wrong_shape_is_named_with_both_shapes(ckpt):
    tensors = tensors_of(ckpt)
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].t()
    rewrite(ckpt, tensors)
    with pytest.raises(ConfigError, match=r"down_proj\.weight has shape \(128, 64\), expected \(64, 128\)"):
        load_model(str(ckpt), "float32", "cpu")


@pytest.mark.parametrize("shape", [(16, 64), (32, 48)], ids=["rows", "columns"])
def test_wrong_shape_of_a_fused_piece(ckpt, shape):
    tensors = tensors_of(ckpt)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(shape)
    rewrite(ckpt, tensors)
    with pytest.raises(ConfigError, match=r"layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(str(ckpt), "float32", "cpu")


def test_tensor_with_no_place_in_the_model(ckpt):
    tensors = tensors_of(ckpt)
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    rewrite(ckpt, tensors)
    with pytest.raises(ConfigError, match=r"extra_proj\.weight has no place"):
        load_model(str(ckpt), "float32", "cpu")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"),
        ({"model_type": "qwen2_moe"}, r"model_type 'qwen2_moe' is not supported"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, r"rope_type 'yarn'"),
    ],
)
def test_unsupported_architectures_are_rejected(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=message):
        load_model(str(ckpt), "float32", "cpu")


def test_engine_reports_loader_errors_as_config_errors(ckpt):
    edit_config(ckpt, model_type="bert")
    with pytest.raises(ConfigError, match="bert"):
        LLMEngine(EngineConfig(model=str(ckpt), dtype="float32", device="cpu", cache=CacheConfig(num_blocks=8)))


def test_unknown_folder_preset_and_device(tmp_path):
    with pytest.raises(ConfigError, match="neither a local folder nor a reachable hub id"):
        load_model(str(tmp_path / "no" / "such" / "model"), "float32", "cpu")
    with pytest.raises(ConfigError, match="unknown preset 'tiny-gpt'"):
        load_model("preset:tiny-gpt", "float32", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            load_model("preset:tiny-llama", "float32", "cuda")
