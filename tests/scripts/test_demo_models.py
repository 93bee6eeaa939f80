"""The demo-model scripts, end to end at toy scale on the CPU: tokenizer
training, model training, saving as an ordinary Hugging Face checkpoint, and
evaluation. (The real demo models are trained on a GPU by run_all.sh.)"""

import json

import pytest
import torch

from scripts.demo_models import evaluate, train, train_tokenizer
from scripts.demo_models.common import EOT


def write_corpus(path, n_docs, offset=0):
    # Small Python-like documents: enough structure for BPE merges and a loss that falls.
    docs = [
        f"def add_{i}(a, b):\n    \"\"\"Add {i} to a + b.\"\"\"\n    return a + b + {i}\n\n\nclass Box{i}:\n    value = {i * 7}\n"
        for i in range(offset, offset + n_docs)
    ]
    path.write_text(EOT.join(docs), encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    write_corpus(tmp / "train.txt", 300)
    write_corpus(tmp / "heldout.txt", 20, offset=1000)
    (tmp / "manifest.json").write_text(json.dumps({"python_version": "3.x", "note": "synthetic"}))
    tok_dir = tmp / "tok"
    train_tokenizer.write_folder(train_tokenizer.train(str(tmp / "train.txt"), vocab_size=320), str(tok_dir))
    train_tokenizer.check(str(tok_dir))  # loads with AutoTokenizer, round-trips, chat template
    out = tmp / "model"
    train.main([
        "--preset", "tiny", "--out", str(out), "--corpus", str(tmp / "train.txt"),
        "--heldout", str(tmp / "heldout.txt"), "--tokenizer", str(tok_dir), "--steps", "8",
        "--batch-size", "2", "--seq-len", "32", "--warmup", "2", "--log-every", "4", "--eval-every", "4",
        "--device", "cpu",
    ])
    return out, tmp


def test_checkpoint_folder_is_complete(trained):
    out, _ = trained
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "training.json", "corpus_manifest.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "held-out perplexity" in card and "final train loss" in card and "--steps 8" in card
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 8 and info["tokens_seen"] == 8 * 2 * 32
    assert info["final_train_loss"] > 0 and info["heldout_ppl"] > 1
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 2]  # <|endoftext|> and <|im_end|>


def test_transformers_loads_it(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings and model.config.dtype == torch.bfloat16
    ids = tok("def add_1(a, b):", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_evaluate_writes_numbers_and_card(trained):
    out, tmp = trained
    # A model against itself: agreement must be exact.
    evaluate.main(["--target", str(out), "--draft", str(out), "--heldout", str(tmp / "heldout.txt"),
                   "--seq-len", "32", "--max-new-tokens", "4", "--device", "cpu"])
    r = json.loads((out / "evaluation.json").read_text())
    assert r["heldout"]["greedy_agreement"] == 1.0
    assert r["on_target_output"]["greedy_agreement_on_target_output"] == 1.0
    assert r["target_ppl"] == pytest.approx(json.loads((out / "training.json").read_text())["heldout_ppl"], rel=1e-3)
    card = (out / "README.md").read_text()
    assert card.count("<!-- evaluation -->") == 1 and "def fibonacci(n):" in card
    evaluate.update_card(str(out), evaluate.card_section(r))  # re-running replaces, not appends
    assert (out / "README.md").read_text().count("## Evaluation") == 1


def test_distill_loss_is_the_kl_from_the_teacher_mixed_with_cross_entropy():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 11, requires_grad=True)
    teacher = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(student.flatten(0, 1), targets.flatten())
    assert train.distill_loss(student, teacher, targets, 1.0).item() == pytest.approx(kl.item(), rel=1e-5)
    assert train.distill_loss(student, teacher, targets, 0.25).item() == pytest.approx((0.25 * kl + 0.75 * ce).item(), rel=1e-5)
    assert train.distill_loss(teacher, teacher, targets, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    train.distill_loss(student, teacher, targets, 1.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_a_draft_distilled_from_a_teacher_says_so_in_its_card(trained):
    teacher, tmp = trained
    out = tmp / "distilled"
    train.main([
        "--preset", "tiny", "--out", str(out), "--corpus", str(tmp / "train.txt"),
        "--heldout", str(tmp / "heldout.txt"), "--tokenizer", str(tmp / "tok"), "--steps", "4",
        "--batch-size", "2", "--seq-len", "32", "--warmup", "2", "--log-every", "2", "--eval-every", "0",
        "--device", "cpu", "--distill-from", str(teacher), "--distill-weight", "0.5",
    ])
    info = json.loads((out / "training.json").read_text())
    assert info["distill_from"] == str(teacher) and info["distill_weight"] == 0.5
    card = (out / "README.md").read_text()
    assert "distilled from model: KL divergence from its next-token distribution, mixed 0.5 : 0.5" in card
    assert f"--distill-from {teacher}" in card


def tiny_run(tmp, out, *extra):
    train.main([
        "--preset", "tiny", "--out", str(out), "--corpus", str(tmp / "train.txt"),
        "--heldout", str(tmp / "heldout.txt"), "--tokenizer", str(tmp / "tok"), "--batch-size", "2",
        "--seq-len", "32", "--warmup", "2", "--log-every", "1", "--eval-every", "0", "--device", "cpu", *extra,
    ])


def test_init_from_refuses_a_checkpoint_of_another_preset(trained, tmp_path):
    init, tmp = trained
    with pytest.raises(SystemExit, match=r"--init-from .* does not match --preset draft: hidden_size 64 \(preset: 192\)"):
        tiny_run(tmp, tmp_path / "out", "--steps", "1", "--init-from", str(init), "--preset", "draft")
    assert not (tmp_path / "out").exists()


def test_init_from_starts_from_the_checkpoints_weights(trained, tmp_path):
    import hashlib

    from safetensors.torch import load_file

    init, tmp = trained
    # A step at a negligible learning rate: the saved (bf16) weights are the init's, not a random draw.
    tiny_run(tmp, tmp_path / "ft", "--steps", "1", "--lr", "1e-12", "--init-from", str(init))
    before, after = load_file(init / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    info = json.loads((tmp_path / "ft" / "training.json").read_text())
    assert info["heldout_ppl"] == pytest.approx(json.loads((init / "training.json").read_text())["heldout_ppl"], rel=1e-4)
    assert info["init_from"] == str(init)
    assert info["init_sha256"] == hashlib.sha256((init / "model.safetensors").read_bytes()).hexdigest()
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "fine-tuned from model" in card and f"--init-from {init}" in card
    assert info["init_sha256"][:16] in card
    # Without --init-from the same run starts from random weights, far from the init's.
    tiny_run(tmp, tmp_path / "scratch", "--steps", "1", "--lr", "1e-12")
    scratch = json.loads((tmp_path / "scratch" / "training.json").read_text())
    assert scratch["init_from"] is None and scratch["heldout_ppl"] > 1.5 * info["heldout_ppl"]
    assert "trained from scratch" in (tmp_path / "scratch" / "README.md").read_text()


def test_records_are_the_targets_greedy_continuations_and_train_a_draft(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from scripts.demo_models import generate_records

    target, tmp = trained
    records_path = tmp_path / "records.pt"
    generate_records.main([
        "--target", str(target), "--corpus", str(tmp / "train.txt"), "--tokenizer", str(tmp / "tok"),
        "--num", "3", "--prompt-tokens", "12", "--output-tokens", "6", "--device", "cpu", "--dtype", "float32",
        "--out", str(records_path),
    ])
    records = torch.load(records_path)
    assert records.shape == (3, 18) and records.dtype == torch.int32
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    for row in records.long():
        greedy = hf.generate(row[None, :12], max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert greedy[0, 12:].tolist() == row[12:].tolist()
    out = tmp_path / "draft"
    tiny_run(tmp, out, "--steps", "2", "--distill-from", str(target), "--train-records", str(records_path))
    info = json.loads((out / "training.json").read_text())
    assert info["corpus"] == str(records_path) and info["seq_len"] == 17 and info["train_tokens"] == 54
