"""Our Llama-family forward pass against transformers' own models, fp32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.model.arch import ModelArch, rope_inv_freq
from engine.model.dense import forward_full_sequence
from engine.model.loader import load_model
from engine.model.presets import PRESETS, preset_config, save_hf_checkpoint

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral")
TOL = 1e-4


def _tokens(n: int, seed: int, vocab: int = 384) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_logits_match_hf(preset, block_size, tiny_checkpoint, hf_model):
    ours = load_model(str(tiny_checkpoint(preset)), "float32", "cpu").model
    tokens = _tokens(37, 1)
    got = forward_full_sequence(ours, tokens, block_size=block_size)
    want = hf_logits(hf_model(preset), tokens)
    assert got.shape == want.shape == (37, 384)
    assert want.std() > 1.0  # spread logits: the comparison means something
    assert (got - want).abs().max().item() < TOL


@pytest.fixture(scope="module")
def perturbed_checkpoint(tiny_checkpoint, tmp_path_factory):
    """perturbed(name) -> a copy whose 1-D tensors (norm weights, q/k/v biases) are random, not HF's 1s and 0s.

    transformers initialises norms to one and biases to zero, so on a fresh
    checkpoint a mix-up of those tensors (q/k/v bias order, q_norm vs k_norm)
    would go unseen.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name + "-perturbed")
            shutil.copytree(tiny_checkpoint(name), folder, dirs_exist_ok=True)
            gen = torch.Generator().manual_seed(7)
            for file in folder.glob("*.safetensors"):
                tensors = load_file(file)
                for key, t in tensors.items():
                    if t.dim() == 1:
                        noise = torch.randn(t.shape, generator=gen)
                        tensors[key] = (0.5 * noise if key.endswith(".bias") else 1.0 + 0.3 * noise).to(t.dtype)
                save_file(tensors, file, metadata={"format": "pt"})
            made[name] = folder
        return made[name]

    return get


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_logits_match_hf_with_random_norms_and_biases(preset, perturbed_checkpoint):
    from transformers import AutoModelForCausalLM

    folder = perturbed_checkpoint(preset)
    ours = load_model(str(folder), "float32", "cpu").model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if preset == "tiny-qwen2":
        assert ours.layers[0].self_attn.qkv_proj.bias.abs().sum() > 0
    if preset == "tiny-qwen3":
        a = ours.layers[0].self_attn
        assert not torch.equal(a.q_norm.weight, a.k_norm.weight)
    tokens = _tokens(29, 8)
    assert (forward_full_sequence(ours, tokens) - hf_logits(hf, tokens)).abs().max().item() < TOL


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_paged_batched_chunked_forward_matches_hf(preset, tiny_checkpoint, hf_model):
    """Two sequences in scattered blocks, fed as a prefill batch and then a mixed chunk + decode batch."""
    model = load_model(str(tiny_checkpoint(preset)), "float32", "cpu").model
    arch = model.arch
    bs, num_blocks = 4, 16
    kv = torch.zeros(arch.num_layers, 2, num_blocks, bs, arch.num_kv_heads, arch.head_dim)
    seqs = [_tokens(15, 2), _tokens(9, 3)]
    tables = [[9, 2, 14, 5], [7, 12, 3]]  # non-contiguous, padded with 0 below

    def run(chunks: list[tuple[int, int]]) -> torch.Tensor:
        ids, pos, slots, qsl, lens, qlens = [], [], [], [0], [], []
        for b, (start, end) in enumerate(chunks):
            ids += seqs[b][start:end]
            pos += list(range(start, end))
            slots += [tables[b][p // bs] * bs + p % bs for p in range(start, end)]
            qsl.append(qsl[-1] + end - start)
            lens.append(end)
            qlens.append(end - start)
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            max_query_len=max(qlens),
            max_seq_len=max(lens),
            query_lens_cpu=qlens,
            seq_lens_cpu=lens,
        )
        with torch.no_grad():
            return model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), kv, meta))

    first = run([(0, 10), (0, 8)])
    second = run([(10, 15), (8, 9)])  # a 5-token chunk and a 1-token decode
    ref = [hf_logits(hf_model(preset), s) for s in seqs]
    assert (first[:10] - ref[0][:10]).abs().max() < TOL
    assert (first[10:] - ref[1][:8]).abs().max() < TOL
    assert (second[:5] - ref[0][10:15]).abs().max() < TOL
    assert (second[5:] - ref[1][8:9]).abs().max() < TOL


def test_llama3_rope_scaling_matches_hf(tmp_path, hf_model):
    cfg = preset_config("tiny-llama")
    cfg["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    folder = save_hf_checkpoint(cfg, tmp_path, seed=0, initializer_range=0.2)
    ours = load_model(str(folder), "float32", "cpu")
    assert ours.arch.rope_scaling is not None and ours.arch.rope_scaling.factor == 8.0
    plain = ModelArch.from_hf_config(preset_config("tiny-llama") | {"rope_parameters": {"rope_theta": 500000.0}})
    assert not torch.allclose(rope_inv_freq(ours.arch), rope_inv_freq(plain))  # scaling changes something
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = _tokens(80, 4)
    diff = (forward_full_sequence(ours.model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff < TOL


def test_llama3_8b_preset_inv_freq_matches_hf():
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset_config("llama3-8b")
    model_type = cfg.pop("model_type")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    got = rope_inv_freq(ModelArch.from_hf_config(PRESETS["llama3-8b"]))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)


def test_architecture_flags_per_family(tiny_checkpoint):
    llama = load_model(str(tiny_checkpoint("tiny-llama")), "float32", "cpu")
    qwen2 = load_model(str(tiny_checkpoint("tiny-qwen2")), "float32", "cpu")
    qwen3 = load_model(str(tiny_checkpoint("tiny-qwen3")), "float32", "cpu")
    assert not llama.arch.qkv_bias and not llama.arch.qk_norm and llama.model.lm_head is not None
    assert qwen2.arch.qkv_bias and qwen2.arch.tie_word_embeddings and qwen2.model.lm_head is None
    assert qwen2.model.layers[0].self_attn.qkv_proj.bias is not None
    assert qwen3.arch.qk_norm and qwen3.arch.num_kv_heads == 1
    assert qwen3.model.layers[0].self_attn.q_norm is not None
    assert llama.arch.eos_token_ids == (2,) and llama.arch.vocab_size == 384


def test_presets_with_random_weights_are_seeded():
    a = load_model("preset:tiny-qwen3", "float32", "cpu", seed=0).model
    b = load_model("preset:tiny-qwen3", "float32", "cpu", seed=0).model
    c = load_model("preset:tiny-qwen3", "float32", "cpu", seed=1).model
    tokens = _tokens(9, 5)
    la, lb, lc = (forward_full_sequence(m, tokens) for m in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)
    assert torch.isfinite(la).all()
