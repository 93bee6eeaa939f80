"""engine.tokenizer.load_tokenizer: the generic fast tokenizer without AutoTokenizer's registry, others through it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from engine.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["def f(x):\n    return x + 1", "The quick brown fox </s> and <s>", "ünïcode and spaces  "]


def test_a_generic_fast_tokenizer_loads_as_autotokenizer_would(text_ckpt):
    from transformers import AutoTokenizer

    ours, auto = load_tokenizer(text_ckpt), AutoTokenizer.from_pretrained(str(text_ckpt))
    assert type(ours) is type(auto)
    for text in TEXTS:
        ids = auto(text).input_ids
        assert ours(text).input_ids == ids and ours.decode(ids) == auto.decode(ids)
    assert (ours.eos_token_id, ours.bos_token_id, len(ours)) == (auto.eos_token_id, auto.bos_token_id, len(auto))


def test_the_generic_fast_tokenizer_skips_the_auto_registry(text_ckpt):
    code = (
        "import sys; from engine.tokenizer import load_tokenizer; load_tokenizer(sys.argv[1]); "
        "print('transformers.models.auto.tokenization_auto' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(text_ckpt)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_named_tokenizer_class_goes_through_autotokenizer(text_ckpt, tmp_path):
    folder = tmp_path / "gpt2-class"
    shutil.copytree(text_ckpt, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    config_path.write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    assert type(tokenizer).__name__.startswith("GPT2Tokenizer")
    assert tokenizer(TEXTS[0]).input_ids == load_tokenizer(text_ckpt)(TEXTS[0]).input_ids


def test_a_folder_without_a_tokenizer_has_none(llama_ckpt, tmp_path):
    assert load_tokenizer(llama_ckpt) is None and load_tokenizer(tmp_path / "missing") is None and load_tokenizer(None) is None
