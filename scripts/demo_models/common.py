"""Pieces shared by the demo-model scripts: special tokens, corpus reading,
tokenizing, held-out evaluation. Nothing here touches the network."""

from __future__ import annotations

import gzip
import math
import os

# Never reach for a model hub: every file these scripts need is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep training logs readable

import torch  # noqa: E402

EOT = "<|endoftext|>"  # document separator; also bos / pad
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # ends a chat turn
SPECIAL_TOKENS = [EOT, IM_START, IM_END]  # ids 0, 1, 2

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_text(path: str) -> str:
    """Corpus files may be stored gzip-compressed (to travel small) or plain."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def tokenize_corpus(path: str, tokenizer_dir: str, max_tokens: int | None = None) -> torch.Tensor:
    """One long int32 stream: <|endoftext|> doc <|endoftext|> doc ...

    Documents are encoded one by one (in parallel, by the Rust tokenizer) and
    joined with the separator id, which is what encoding the whole text would
    give too, since the separator is a special token that BPE never merges."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(read_text(path).split(EOT), add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.int32)


def heldout_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and their next tokens)."""
    n = (len(ids) - 1) // seq_len
    return torch.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).long()


def autocast(device: torch.device):
    """bf16 autocast on CUDA (what training uses); plain fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over every position of the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        with autocast(device):
            logits = model(input_ids=w[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
