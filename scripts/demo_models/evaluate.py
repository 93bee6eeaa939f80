"""Evaluate a demo target and its draft together, from their saved folders.

Reports each model's held-out perplexity, how often the draft's greedy next
token equals the target's (on held-out text, and on text the target itself
generates greedily, which is what speculative decoding verifies), and the
target's greedy completions of a code prompt and a chat prompt. Writes
evaluation.json into both folders and adds an Evaluation section to both
model cards (replacing an earlier one).

    python -m scripts.demo_models.evaluate --target models/demo-target --draft models/demo-draft
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import time

from scripts.demo_models.common import autocast, heldout_windows, perplexity, pick_device, tokenize_corpus

import torch  # noqa: E402

BEGIN, END = "<!-- evaluation -->", "<!-- /evaluation -->"
CODE_PROMPT = "def fibonacci(n):"
CHAT_PROMPT = "Write a Python function `fibonacci(n)` that returns the n-th Fibonacci number."


def load(folder: str, device: torch.device):
    """The ordinary transformers loading path, as for any checkpoint on disk."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def agreement_on_heldout(target, draft, windows, device, batch_size: int = 16) -> dict:
    """Fraction of held-out positions where both models' argmax next token agree."""
    agree = target_right = draft_right = n = 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        with autocast(device):
            t = target(input_ids=w[:, :-1]).logits.argmax(-1)
            d = draft(input_ids=w[:, :-1]).logits.argmax(-1)
        agree += (t == d).sum().item()
        target_right += (t == w[:, 1:]).sum().item()
        draft_right += (d == w[:, 1:]).sum().item()
        n += t.numel()
    return {"greedy_agreement": agree / n, "target_top1": target_right / n, "draft_top1": draft_right / n, "positions": n}


@torch.no_grad()
def agreement_on_target_text(target, draft, windows, device, prompts: int = 32, prompt_len: int = 32, new: int = 64) -> dict:
    """Let the target continue held-out prompts greedily, then count how often the
    draft's argmax predicts the target's token: the acceptance rate of greedy
    speculative decoding, per token."""
    seq = windows[:prompts, :prompt_len].to(device)
    for _ in range(new):  # no KV cache: a few short passes, and no cache code to trust
        with autocast(device):
            nxt = target(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    with autocast(device):
        d = draft(input_ids=seq[:, :-1]).logits.argmax(-1)
    hits = d[:, prompt_len - 1 :] == seq[:, prompt_len:]
    return {"greedy_agreement_on_target_output": hits.float().mean().item(), "positions": hits.numel()}


@torch.no_grad()
def complete(model, tok, text: str, device, new: int = 64, chat: bool = False) -> str:
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(device)
    # Greedy, stopping at the generation_config's eos list like a server would.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


def card_section(r: dict) -> str:
    code = r["target_completion"].replace("```", "'''")
    chat = r["target_chat_completion"].replace("```", "'''")
    return f"""{BEGIN}
## Evaluation

From `scripts/demo_models/evaluate.py` ({r['device']}, {r['seconds']:.0f} s); full numbers in evaluation.json.

| | target | draft |
| --- | --- | --- |
| parameters | {r['target_params']:,} | {r['draft_params']:,} |
| held-out perplexity | {r['target_ppl']:.3f} | {r['draft_ppl']:.3f} |
| held-out top-1 next-token accuracy | {r['heldout']['target_top1']:.3f} | {r['heldout']['draft_top1']:.3f} |

Greedy agreement (draft argmax == target argmax): **{r['heldout']['greedy_agreement']:.3f}** over
{r['heldout']['positions']:,} held-out positions; **{r['on_target_output']['greedy_agreement_on_target_output']:.3f}**
over {r['on_target_output']['positions']:,} tokens the target generated greedily from held-out prompts.

Target, greedy, {r['max_new_tokens']} new tokens after `{CODE_PROMPT}`:

```
{CODE_PROMPT}{code}
```

Target, greedy, chat prompt "{CHAT_PROMPT}" (ChatML template):

```
{chat}
```
{END}
"""


def update_card(folder: str, section: str) -> None:
    path = os.path.join(folder, "README.md")
    text = open(path).read() if os.path.exists(path) else ""
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", "", text, flags=re.S).rstrip("\n")
    with open(path, "w") as f:
        f.write(text + "\n\n" + section)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="models/demo-target")
    ap.add_argument("--draft", default="models/demo-draft")
    ap.add_argument("--heldout", default=".corpus/heldout.txt.gz")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    t0 = time.time()

    from transformers import AutoTokenizer

    # Agreement only means something if both read the same token ids.
    assert filecmp.cmp(os.path.join(args.target, "tokenizer.json"), os.path.join(args.draft, "tokenizer.json"), shallow=False), \
        "target and draft must share one tokenizer"
    tok = AutoTokenizer.from_pretrained(args.target)
    windows = heldout_windows(tokenize_corpus(args.heldout, args.target, args.eval_tokens), args.seq_len)
    target, draft = load(args.target, device), load(args.draft, device)

    r = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "target": args.target, "draft": args.draft, "heldout_file": args.heldout,
        "heldout_tokens": int(windows[:, 1:].numel()), "seq_len": args.seq_len,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "target_ppl": perplexity(target, windows, device),
        "draft_ppl": perplexity(draft, windows, device),
        "heldout": agreement_on_heldout(target, draft, windows, device),
        "on_target_output": agreement_on_target_text(target, draft, windows, device),
        "max_new_tokens": args.max_new_tokens,
        "prompt": CODE_PROMPT,
        "target_completion": complete(target, tok, CODE_PROMPT, device, args.max_new_tokens),
        "draft_completion": complete(draft, tok, CODE_PROMPT, device, args.max_new_tokens),
        "chat_prompt": CHAT_PROMPT,
        "target_chat_completion": complete(target, tok, CHAT_PROMPT, device, 2 * args.max_new_tokens, chat=True),
    }
    r["seconds"] = time.time() - t0
    for folder in (args.target, args.draft):
        with open(os.path.join(folder, "evaluation.json"), "w") as f:
            json.dump(r, f, indent=1)
        update_card(folder, card_section(r))
    print(json.dumps(r, indent=1), flush=True)


if __name__ == "__main__":
    main()
