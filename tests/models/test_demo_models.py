"""The bundled demo models load through the engine's ordinary loader, like any user checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("name", ["demo-target", "demo-draft"])
def test_demo_model_greedy_equals_transformers(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = MODELS / name
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", device="cpu"))
    prompt = "def fibonacci(n):"
    ours = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    ref = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1] :]
    assert ours.token_ids == ref.tolist()
    assert ours.text == tok.decode(ref, skip_special_tokens=True)


def test_target_and_draft_share_the_tokenizer_and_record_their_training():
    target, draft = MODELS / "demo-target", MODELS / "demo-draft"
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    for folder in (target, draft):
        card = (folder / "README.md").read_text()
        assert "perplexity" in card.lower()
        training = json.loads((folder / "training.json").read_text())
        assert training["steps"] > 0
