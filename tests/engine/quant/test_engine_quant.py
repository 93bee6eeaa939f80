"""Quantized models through the engine: they generate, a converted checkpoint gives exactly what
quantizing at load gives, and clear ConfigErrors for what cannot run or does not match."""

from __future__ import annotations

import json

import pytest
import torch

from engine import ConfigError, QuantConfig, SamplingParams
from engine.model.dense import forward_full_sequence
from engine.model.loader import load_model
from engine.quant.convert import convert, main as convert_main
from engine.quant.fp8 import Fp8Linear
from engine.quant.int4 import Int4Linear
from engine.quant.int8 import Int8Embedding, Int8Linear

PROMPTS = ["def fibonacci(n):", "The quick brown fox"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
INT4_AWQ = QuantConfig(method="int4", group_size=32, awq=True)
INT4_RTN = QuantConfig(method="int4", group_size=32, awq=False)
INT8 = QuantConfig(method="int8")


def tokens(engine, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in engine.generate(prompts, GREEDY)]


def logits(engine, text="Hello, world! def fibonacci(n):"):
    return forward_full_sequence(engine.model, engine.tokenize(text))


@pytest.mark.parametrize("quant", [INT8, INT4_RTN, INT4_AWQ], ids=["int8", "int4-rtn", "int4-awq"])
def test_quantized_tiny_model_generates_close_to_float(make_engine, text_ckpt, quant):
    ref = make_engine(text_ckpt)
    engine = make_engine(text_ckpt, quantization=quant)
    kinds = {type(m) for m in engine.model.modules()}
    assert {type(engine.model.embed_tokens), type(engine.model.lm_head)} <= kinds
    assert isinstance(engine.model.embed_tokens, Int8Embedding)
    assert (Int8Linear if quant.method == "int8" else Int4Linear) in kinds
    assert not any(isinstance(m, torch.nn.Linear) for m in engine.model.modules())
    out = tokens(engine)
    assert [len(t) for t in out] == [8, 8]
    a, b = logits(ref), logits(engine)
    # Mean cosine of the logits over positions. This tiny random model (weights of std 0.2)
    # amplifies errors layer by layer more than a trained one does; the demo model's
    # perplexity (bench/quant.py, BENCHMARKS.md) is the real quality figure.
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
    assert cos > (0.998 if quant.method == "int8" else 0.9), cos
    if quant.method == "int8":
        assert out == tokens(ref)


def test_quantized_demo_model_generates(make_engine):
    ref = make_engine("models/demo-target", num_blocks=64, block_size=16)
    int8 = make_engine("models/demo-target", num_blocks=64, block_size=16, quantization=INT8)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    assert int8.generate(["def fibonacci(n):"], params)[0].outputs[0].text == \
        ref.generate(["def fibonacci(n):"], params)[0].outputs[0].text
    int4 = make_engine("models/demo-target", num_blocks=64, block_size=16, quantization=QuantConfig("int4", awq=False))
    text = int4.generate(["def fibonacci(n):"], params)[0].outputs[0].text
    assert len(int4.tokenize(text)) >= 8 and text.strip()


def test_fp8_on_the_cpu_is_a_config_error(make_engine, text_ckpt):
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        make_engine(text_ckpt, quantization=QuantConfig(method="fp8"))


# ----- the converter and quantized checkpoints ----------------------------------------------


@pytest.fixture(scope="module")
def converted(text_ckpt, tmp_path_factory):
    """name -> folder of text_ckpt converted (float32 tensors, so an fp32 engine reads them exactly)."""
    made = {}

    def get(name: str, quant: QuantConfig, dtype: str = "float32"):
        if name not in made:
            made[name] = convert(str(text_ckpt), tmp_path_factory.mktemp(name), quant, "cpu", dtype)
        return made[name]

    return get


@pytest.mark.parametrize("name, quant", [("rt-int8", INT8), ("rt-int4-awq", INT4_AWQ)])
def test_converter_round_trip_is_identical(make_engine, text_ckpt, converted, name, quant):
    folder = converted(name, quant)
    at_load = make_engine(text_ckpt, quantization=quant)
    from_ckpt = make_engine(folder, quantization=quant)
    assert torch.equal(logits(from_ckpt), logits(at_load))
    assert tokens(from_ckpt) == tokens(at_load)
    for name, t in at_load.model.state_dict().items():
        assert torch.equal(from_ckpt.model.state_dict()[name], t), name


def test_converter_round_trip_in_bf16(text_ckpt, converted):
    folder = converted("rt-bf16", INT4_RTN, dtype="bfloat16")
    from engine.quant import apply_quantization

    at_load = load_model(str(text_ckpt), "bfloat16", "cpu")
    apply_quantization(at_load.model, INT4_RTN)
    from_ckpt = load_model(str(folder), "bfloat16", "cpu")
    assert from_ckpt.quantization == INT4_RTN
    ids = list(range(3, 40))
    assert torch.equal(forward_full_sequence(from_ckpt.model, ids), forward_full_sequence(at_load.model, ids))


def test_checkpoint_layout_scheme_in_config_not_in_names(converted, text_ckpt):
    folder = converted("rt-int4-awq", INT4_AWQ)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "rayllm-serve", "format_version": 1, "method": "int4", "group_size": 32, "awq": True,
    }
    assert cfg["hidden_size"] == json.loads((text_ckpt / "config.json").read_text())["hidden_size"]
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any("int4" in n or "awq" in n for n in names)


def test_fp8_checkpoint_converts_anywhere_but_runs_only_on_fp8_gpus(make_engine, converted):
    folder = converted("fp8", QuantConfig(method="fp8"))
    loaded = load_model(str(folder), "float32", "cpu")
    assert any(isinstance(m, Fp8Linear) for m in loaded.model.modules())
    with pytest.raises(ConfigError, match="compute capability"):
        make_engine(folder, quantization=QuantConfig(method="fp8"))


@pytest.mark.parametrize(
    "wanted",
    [QuantConfig(), INT8, INT4_RTN, QuantConfig(method="int4", group_size=64, awq=True)],
    ids=["none", "int8", "no-awq", "group-64"],
)
def test_mismatched_checkpoint_and_config_is_a_config_error(make_engine, converted, wanted):
    folder = converted("rt-int4-awq", INT4_AWQ)
    with pytest.raises(ConfigError, match=r"quantized as int4 \(group_size 32, awq true\)"):
        make_engine(folder, quantization=wanted)


def test_foreign_or_broken_quantized_checkpoints(copy_checkpoint, text_ckpt, converted, tmp_path):
    foreign = copy_checkpoint(text_ckpt, quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(ConfigError, match="format this engine does not read"):
        load_model(str(foreign), "float32", "cpu")
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(converted("rt-int8", INT8))
    tensors = load_file(folder / "model.safetensors")
    del tensors["layers.0.mlp.down_proj.scales"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ConfigError, match="lacks 1 tensors"):
        load_model(str(folder), "float32", "cpu")


def test_convert_cli(text_ckpt, converted, tmp_path, capsys):
    assert convert_main(["--model", str(text_ckpt), "--method", "int8", "--out", str(tmp_path / "q")]) == 0
    assert "wrote" in capsys.readouterr().out
    again = convert_main(["--model", str(converted("rt-int8", INT8)), "--method", "int8", "--out", str(tmp_path / "x")])
    assert again == 2 and "already quantized" in capsys.readouterr().err
