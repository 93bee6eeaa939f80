"""Train one demo model (a small LlamaForCausalLM) from scratch and save it as
an ordinary Hugging Face checkpoint with its tokenizer and a model card.

    python -m scripts.demo_models.train --preset target --time-budget 240 --out models/demo-target

With --time-budget the run times its first steps, then fixes the total step
count so that training fits the budget; the model card records that count,
and `--steps N` with the same other flags repeats the run on the same kind
of device (same seed, data order and schedule; up to GPU non-determinism).

A draft for speculative decoding is worth what it agrees with its target, so
it can learn from the target itself: with `--distill-from models/demo-target`
the loss is the KL divergence from the target's next-token distribution on
the same windows (mixed with plain cross-entropy by --distill-weight).

    python -m scripts.demo_models.train --preset draft --time-budget 90 --out models/demo-draft \
        --distill-from models/demo-target

`--init-from FOLDER` starts from a saved checkpoint of the same preset instead
of random weights: to fine-tune an existing draft toward its target, say,
without training it again from scratch.

    python -m scripts.demo_models.train --preset draft --init-from models/demo-draft \
        --distill-from models/demo-target --time-budget 900 --out /tmp/draft-kd
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time

from scripts.demo_models.common import (  # sets the offline env vars before transformers loads
    EOT, IM_END, SPECIAL_TOKENS, TOKENIZER_FILES, autocast, heldout_windows, perplexity, pick_device,
    tokenize_corpus,
)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Architectures. head_dim 64 for both, so kernels tuned for one fit the other;
# grouped-query attention (fewer kv heads) as in Llama 3 / Qwen, so the serving
# engine's GQA path is exercised by the demo models too.
PRESETS = {
    "target": dict(
        arch=dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=1024),
        batch_size=64, lr=2e-3,
    ),
    "draft": dict(
        arch=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
                  intermediate_size=512),
        batch_size=64, lr=3e-3,
    ),
    # Half the draft's layers: proposals cost about half as much (a small model's step is
    # mostly per-layer launches), at some cost in agreement with the target.
    "draft2": dict(
        arch=dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                  intermediate_size=512),
        batch_size=64, lr=3e-3,
    ),
    # For tests and CPU smoke runs only.
    "tiny": dict(
        arch=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=128),
        batch_size=4, lr=3e-3,
    ),
}
MAX_POSITIONS = 2048  # rope works past the training length, but quality beyond it is untested
TIMING_STEPS = 30
UNKNOWN = 10**9  # step count before a time budget has been turned into one
EVAL_SLICE = 64  # windows of held-out text looked at during training  # steps timed before a time budget is turned into a step count


def build_model(preset: str, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,  # embeddings are a big share of a model this small
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=SPECIAL_TOKENS.index(EOT),
        eos_token_id=SPECIAL_TOKENS.index(EOT),
        pad_token_id=SPECIAL_TOKENS.index(EOT),
        **PRESETS[preset]["arch"],
    )
    # sdpa: flash attention on the GPU, the plain math kernel on the CPU.
    return LlamaForCausalLM(config).to(torch.float32), config


def load_init(path: str, preset: str, vocab_size: int):
    """The weights to start from. Only a checkpoint of the preset's own shape:
    the card describes the architecture by its preset, so it must not lie."""
    from transformers import LlamaConfig, LlamaForCausalLM

    want = dict(PRESETS[preset]["arch"], vocab_size=vocab_size)
    config = LlamaConfig.from_pretrained(path)
    wrong = {k: (getattr(config, k, None), v) for k, v in want.items() if getattr(config, k, None) != v}
    if wrong:
        detail = ", ".join(f"{k} {got} (preset: {v})" for k, (got, v) in wrong.items())
        raise SystemExit(f"--init-from {path} does not match --preset {preset}: {detail}")
    # fp32 master weights whatever the checkpoint was saved in (bf16 for the demo models).
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def start_model(args: argparse.Namespace, vocab_size: int):
    """(model, sha256 of the init weights or None): random init, or --init-from's weights."""
    if not args.init_from:
        return build_model(args.preset, vocab_size)[0], None
    digest = weights_digest(args.init_from)  # read before --out (maybe the same folder) is overwritten
    return load_init(args.init_from, args.preset, vocab_size), digest


def weights_digest(path: str) -> str:
    """sha256 of the init checkpoint's weights: the folder may be overwritten by this very run."""
    h = hashlib.sha256()
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * KL(teacher || student) + (1 - weight) * cross-entropy on the true next tokens, per token."""
    log_student = F.log_softmax(student_logits.float().flatten(0, 1), dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    if weight >= 1.0:
        return kl
    return weight * kl + (1.0 - weight) * F.nll_loss(log_student, targets.flatten())


def load_teacher(path: str, vocab_size: int, device: torch.device):
    """The frozen model to distil from; it must share the student's tokenizer."""
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    if teacher.config.vocab_size != vocab_size:
        raise SystemExit(f"--distill-from {path}: vocab {teacher.config.vocab_size} != the tokenizer's {vocab_size}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    # Decay matrices (embeddings included), not norm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def write_generation_config(out: str) -> None:
    from transformers import GenerationConfig

    eos = [SPECIAL_TOKENS.index(EOT), SPECIAL_TOKENS.index(IM_END)]  # a document's end, a chat turn's end
    GenerationConfig(bos_token_id=eos[0], eos_token_id=eos, pad_token_id=eos[0], do_sample=False).save_pretrained(out)


def model_card(out: str, r: dict) -> str:
    a = r["arch"]
    m = r.get("corpus_manifest") or {}
    try:
        corpus = (
            f"Python {m['python_version']} standard library: {m['train_files']} source files plus "
            f"{m['chat_examples']} ChatML examples made from their documented functions "
            f"({m['train']['bytes']:,} bytes); held out: {len(m['heldout_files'])} files "
            f"({m['heldout']['bytes']:,} bytes), {m['heldout_rule']}. See corpus_manifest.json."
        )
    except KeyError:  # a corpus not made by build_corpus.py
        corpus = f"`{r['corpus']}`"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
license: other
---

# {os.path.basename(os.path.normpath(out))}

A small Llama-family causal language model {_origin(r)} for this
project's demo and tests: the `{r['preset']}` preset of
`scripts/demo_models/train.py`. It writes Python-flavoured text; it knows
nothing else. Trained on the Python standard library's source (PSF License).

| | |
| --- | --- |
| architecture | LlamaForCausalLM, hidden {a['hidden_size']}, {a['num_hidden_layers']} layers, {a['num_attention_heads']} heads / {a['num_key_value_heads']} kv heads (head_dim {a['hidden_size'] // a['num_attention_heads']}), MLP {a['intermediate_size']}, tied embeddings |
| parameters | {r['params']:,} |
| weights | bfloat16, model.safetensors |
| tokenizer | byte-level BPE, {r['vocab_size']} tokens (models/demo-tokenizer); `<\\|endoftext\\|>` separates documents, ChatML `<\\|im_start\\|>` / `<\\|im_end\\|>` for chat |
| corpus | {corpus} |
| training | {r['steps']} steps x {r['batch_size']} x {r['seq_len']} tokens = {r['tokens_seen']:,} tokens ({r['epochs']:.1f} epochs of {r['train_tokens']:,}); AdamW lr {r['lr']} (warmup {r['warmup']}, cosine to 10%), wd {r['weight_decay']}, seed {r['seed']} |
| initial weights | {_start(r)} |
| objective | {_objective(r)} |
| time | {r['train_seconds']:.0f} s on {r['device_name']} ({r['tokens_per_second']:,.0f} tokens/s) |
| final train loss | {r['final_train_loss']:.4f} (the objective above, mean of the last {r['loss_window']} steps) |
| held-out perplexity | {r['heldout_ppl']:.3f} ({r['heldout_tokens']:,} tokens, windows of {r['seq_len']}, saved bf16 weights) |
| software | torch {r['torch']}, transformers {r['transformers']}, Python {r['python']} |

Reproduce:

```
{r['reproduce']}
```

Trained on windows of {r['seq_len']} tokens: longer contexts load and run
(max_position_embeddings {MAX_POSITIONS}) but are untested.
"""


def _origin(r: dict) -> str:
    if not r.get("init_from"):
        return "trained from scratch"
    return f"fine-tuned from {os.path.basename(os.path.normpath(r['init_from']))}"


def _start(r: dict) -> str:
    if not r.get("init_from"):
        return f"random (seed {r['seed']})"
    # The digest names the exact weights, since the path may now hold this model.
    return f"`{r['init_from']}` (model.safetensors sha256 {r['init_sha256'][:16]}...)"


def _objective(r: dict) -> str:
    if not r.get("distill_from"):
        return "next-token cross-entropy on the corpus"
    teacher = os.path.basename(os.path.normpath(r["distill_from"]))
    w = r["distill_weight"]
    mix = "" if w >= 1.0 else f", mixed {w:g} : {1 - w:g} with next-token cross-entropy"
    return f"distilled from {teacher}: KL divergence from its next-token distribution{mix}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default=".corpus/train.txt.gz")
    ap.add_argument("--heldout", default=".corpus/heldout.txt.gz")
    ap.add_argument("--manifest", default=None, help="corpus manifest (default: manifest.json beside --corpus)")
    ap.add_argument("--tokenizer", default="models/demo-tokenizer")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int)
    budget.add_argument("--time-budget", type=float, help="seconds of training; sets --steps after timing")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-tokens", type=int, default=None, help="cap on held-out tokens (default: all)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=1000, help="log held-out loss on a slice every N steps (0: never)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    ap.add_argument("--distill-from", default=None, help="teacher checkpoint (same tokenizer): learn its distribution")
    ap.add_argument("--distill-weight", type=float, default=1.0, help="share of the KL term; the rest is cross-entropy")
    ap.add_argument("--init-from", default=None, help="checkpoint of the same preset to start from (default: random init)")
    ap.add_argument(
        "--train-records", default=None,
        help="train on the rows of this [N, L] token tensor (generate_records.py: the target's own continuations) "
        "instead of windows of --corpus; sets --seq-len to L - 1",
    )
    args = ap.parse_args(argv)
    if not 0.0 < args.distill_weight <= 1.0:
        ap.error("--distill-weight must be in (0, 1]")
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or preset["batch_size"]
    peak_lr = args.lr or preset["lr"]
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.time()
    records = None
    if args.train_records:
        records = torch.load(args.train_records).to(device)
        args.seq_len = records.shape[1] - 1
        train_ids = records.flatten()  # counted as the training tokens
    else:
        train_ids = tokenize_corpus(args.corpus, args.tokenizer).to(device)
    held = heldout_windows(tokenize_corpus(args.heldout, args.tokenizer, args.eval_tokens), args.seq_len)
    print(f"tokenized {len(train_ids):,} train / {held[:, 1:].numel():,} held-out tokens in {time.time() - t0:.1f} s", flush=True)

    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json")).get_vocab_size()
    model, init_sha256 = start_model(args, vocab_size)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params:,} parameters on {device}", flush=True)
    step_fn = torch.compile(model) if args.compile else model
    teacher = load_teacher(args.distill_from, vocab_size, device) if args.distill_from else None
    opt = make_optimizer(model, peak_lr, args.weight_decay, device)

    # The data order is its own seeded generator, so it does not depend on how
    # many random numbers model initialisation drew.
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1, device=device)
    total = args.steps if args.steps is not None else UNKNOWN  # until timed
    warmup = args.warmup
    losses: list[torch.Tensor] = []  # kept on the device: no sync per step
    log: list[dict] = []
    step, t_start, t_timing = 0, time.time(), None
    while step < total:
        if args.time_budget is not None and step == 5:
            _sync(device)
            t_timing = time.time()  # steps 0-4 pay for kernel selection and caches
        if args.time_budget is not None and step == 5 + TIMING_STEPS:
            _sync(device)
            per_step = (time.time() - t_timing) / TIMING_STEPS
            left = args.time_budget - (time.time() - t_start)
            total = step + max(0, int(left / per_step))
            if total < 2 * warmup:
                print(f"warning: {total} steps leave little room after {warmup} warmup steps", flush=True)
            print(f"{per_step * 1000:.1f} ms/step -> {total} steps in {args.time_budget:.0f} s", flush=True)
        if records is not None:  # random rows, each one whole window
            w = records[torch.randint(0, len(records), (batch_size,), device=device, generator=gen)].long()
        else:  # random contiguous windows of the token stream
            starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (batch_size,), device=device, generator=gen)
            w = train_ids[starts[:, None] + offsets].long()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, peak_lr, warmup)
        with autocast(device):
            logits = step_fn(input_ids=w[:, :-1]).logits
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=w[:, :-1]).logits
        if teacher is None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())
        else:
            loss = distill_loss(logits, teacher_logits, w[:, 1:], args.distill_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.detach())
        if step % args.log_every == 0 or step == total:
            recent = torch.stack(losses[-args.log_every :]).mean().item()
            elapsed = time.time() - t_start
            log.append({"step": step, "loss": round(recent, 4), "seconds": round(elapsed, 1)})
            of = "?" if total == UNKNOWN else total
            print(f"step {step}/{of} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{step * batch_size * args.seq_len / elapsed:,.0f} tok/s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < total:
            # A cheap look at held-out loss on the way, so over-fitting from
            # repeated epochs shows in the log (never used to pick weights).
            loss_h = math.log(perplexity(model, held[:EVAL_SLICE], device))
            model.train()
            log.append({"step": step, "heldout_loss_slice": round(loss_h, 4)})
            print(f"step {step} held-out loss (first {EVAL_SLICE} windows) {loss_h:.4f}", flush=True)
    _sync(device)
    train_seconds = time.time() - t_start
    loss_window = min(50, len(losses))
    final_loss = torch.stack(losses[-loss_window:]).mean().item()

    # Save in bf16 (half the bytes; what the engine serves), then evaluate
    # exactly those rounded weights.
    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    model.to(torch.float32)
    write_generation_config(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(args.tokenizer, name), os.path.join(args.out, name))
    manifest_path = args.manifest or os.path.join(os.path.dirname(args.corpus), "manifest.json")
    manifest = None
    if os.path.exists(manifest_path):
        shutil.copy(manifest_path, os.path.join(args.out, "corpus_manifest.json"))
        with open(manifest_path) as f:
            manifest = json.load(f)
    ppl = perplexity(model, held, device)

    import transformers

    tokens_seen = step * batch_size * args.seq_len
    repro = dict(vars(args), steps=step, time_budget=None, batch_size=batch_size, lr=peak_lr)
    result = {
        "preset": args.preset, "arch": PRESETS[args.preset]["arch"], "params": params, "vocab_size": vocab_size,
        "corpus": args.train_records or args.corpus, "train_tokens": len(train_ids), "heldout_tokens": int(held[:, 1:].numel()),
        "steps": step, "batch_size": batch_size, "seq_len": args.seq_len, "tokens_seen": tokens_seen,
        "epochs": tokens_seen / len(train_ids), "lr": peak_lr, "warmup": warmup, "weight_decay": args.weight_decay,
        "seed": args.seed, "train_seconds": train_seconds, "tokens_per_second": tokens_seen / train_seconds,
        "final_train_loss": final_loss, "loss_window": loss_window, "heldout_ppl": ppl,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "reproduce": "python -m scripts.demo_models.train " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")
            for k, v in repro.items() if v is not None and v is not False
        ),
        "corpus_manifest": manifest, "log": log,
        "distill_from": args.distill_from, "distill_weight": args.distill_weight if args.distill_from else None,
        "init_from": args.init_from, "init_sha256": init_sha256,
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "corpus_manifest"}, f, indent=1)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(model_card(args.out, result))
    print(f"saved {args.out}: {step} steps, final loss {final_loss:.4f}, held-out ppl {ppl:.3f}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
