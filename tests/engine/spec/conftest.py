"""Fixtures of the speculative-decoding tests: tiny targets and drafts that share a vocabulary.

The target is the shared tiny Llama (random weights, seed 0). Drafts: the
target itself (every proposal is accepted at temperature 0), the target
with noise on its weights (some are), and a smaller model of another shape
(1 layer, 1 KV head: its cache has another geometry over the same blocks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spec_stats, the chi-square helpers

SMALL_DRAFT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}


def noisy_copy(src: Path, dst: Path, scale: float, seed: int) -> Path:
    """A checkpoint with Gaussian noise (scale x each matrix's std) on every weight matrix of `src`."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    gen = torch.Generator().manual_seed(seed)
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        noisy = {
            name: (t + scale * torch.randn(t.shape, generator=gen) * t.std()).contiguous() if t.dim() == 2 else t
            for name, t in tensors.items()
        }
        save_file(noisy, dst / f.name, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def noisy_draft(llama_ckpt, tmp_path_factory) -> Path:
    """The target with a little noise on its weights: a draft that is often right."""
    return noisy_copy(llama_ckpt, tmp_path_factory.mktemp("noisy-draft"), scale=0.02, seed=1)


@pytest.fixture(scope="session")
def small_draft(tmp_path_factory) -> Path:
    from engine.model.presets import preset_config, save_hf_checkpoint

    cfg = preset_config("tiny-llama")
    cfg.update(SMALL_DRAFT)
    return save_hf_checkpoint(cfg, tmp_path_factory.mktemp("small-draft"), seed=1, initializer_range=0.2)


@pytest.fixture(scope="session")
def vocab8_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(target, draft) with a vocabulary of 8 tokens, for counting sampled tokens; the draft is noisier."""
    from engine.model.presets import preset_config, save_hf_checkpoint

    cfg = preset_config("tiny-llama")
    cfg.update(vocab_size=8, bos_token_id=1, eos_token_id=2)
    target = save_hf_checkpoint(cfg, tmp_path_factory.mktemp("vocab8-target"), seed=0, initializer_range=0.3)
    return target, noisy_copy(target, tmp_path_factory.mktemp("vocab8-draft"), scale=0.5, seed=2)
