"""Shared fixtures: tiny random checkpoints written once per session, a tiny byte-level tokenizer.

Checkpoints are written with transformers' own model classes
(`save_hf_checkpoint`), so our loader and Hugging Face read the very same
files. initializer_range=0.2 spreads the logits so that a greedy argmax is
never decided by float noise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is first
# imported, and any test module (bench scripts included) may import the engine's kernel modules
# first. Without a GPU every Triton test runs under the interpreter, so switch it on before any of
# them is collected; a test that compiles for real clears it in its own subprocess.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")

_TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog. A serving system batches many requests;
each request holds a prompt and a budget of new tokens. Blocks of the cache are shared
when prompts share a prefix, and the least recently used block is evicted first.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
Hello, world! 0123456789 Stop strings end a completion early; the text is cut before the
stop string. Sampling with a temperature, top-k and top-p keeps only the likely tokens.
Continuous batching admits new requests at every step; chunked prefill splits long prompts.
Preemption frees the blocks of the newest request and recomputes it later, never running out.
"""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """checkpoint(name) -> folder of a tiny preset with random weights (seed 0), written once."""
    from engine.model.presets import save_hf_checkpoint

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            made[name] = save_hf_checkpoint(name, folder, seed=0, initializer_range=0.2)
        return made[name]

    return get


@pytest.fixture(scope="session")
def llama_ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("tiny-llama")


@pytest.fixture(scope="session")
def copy_checkpoint(tmp_path_factory):
    """copy(src, **config_overrides) -> a fresh copy of a checkpoint folder, config.json edited."""

    def copy(src: Path, **overrides) -> Path:
        dst = tmp_path_factory.mktemp(src.name + "-copy")
        shutil.copytree(src, dst, dirs_exist_ok=True)
        if overrides:
            cfg_path = dst / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.update(overrides)
            cfg_path.write_text(json.dumps(cfg))
        return dst

    return copy


@pytest.fixture(scope="session")
def make_byte_tokenizer():
    """make(full_byte_alphabet) -> a small byte-level BPE PreTrainedTokenizerFast.

    Special tokens <pad>, <s>, </s> are ids 0, 1, 2 (the presets' bos 1 and eos 2).
    Without the full byte alphabet every token decodes to ASCII text of the
    training text; with it, lone bytes of multi-byte characters are tokens too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def make(full_byte_alphabet: bool = False, vocab_size: int = 300) -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else [],
            show_progress=False,
        )
        tok.train_from_iterator([_TOKENIZER_TEXT], trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            clean_up_tokenization_spaces=False,
        )

    return make


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory, make_byte_tokenizer) -> Path:
    """A tiny Llama checkpoint with a tokenizer (ASCII-only vocabulary) whose size is the model's vocab."""
    from engine.model.presets import preset_config, save_hf_checkpoint

    tokenizer = make_byte_tokenizer(full_byte_alphabet=False)
    cfg = preset_config("tiny-llama")
    cfg["vocab_size"] = len(tokenizer)
    folder = save_hf_checkpoint(cfg, tmp_path_factory.mktemp("tiny-llama-text"), seed=0, initializer_range=0.2)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_engine():
    """make(path, block_size=4, num_blocks=256, prefix_caching=True, max_num_batched_tokens=..., ...) -> LLMEngine (fp32, CPU)."""
    from engine import CacheConfig, EngineConfig, LLMEngine, SchedulerConfig

    def make(
        path,
        block_size: int = 4,
        num_blocks: int | None = 256,
        prefix_caching: bool = True,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        enable_chunked_prefill: bool = True,
        **kwargs,
    ) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=str(path),
                dtype="float32",
                device="cpu",
                cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
                scheduler=SchedulerConfig(
                    max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens,
                    enable_chunked_prefill=enable_chunked_prefill,
                ),
                **kwargs,
            )
        )

    return make


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    """hf(name) -> transformers' own fp32 model of a tiny preset checkpoint (the oracle), loaded once."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(name), dtype=torch.float32).eval()
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def hf_greedy(hf_model):
    """greedy(name, prompt, max_new_tokens) -> HF generate's new tokens (no eos stop), memoised."""
    import torch

    memo: dict = {}

    def run(name: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (name, tuple(prompt), max_new_tokens)
        if key not in memo:
            out = hf_model(name).generate(
                torch.tensor([prompt]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            memo[key] = out[0, len(prompt) :].tolist()
            assert len(memo[key]) == max_new_tokens
        return memo[key]

    return run
