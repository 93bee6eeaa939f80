"""Perplexity of a (quantized) model on held-out text, through our own forward pass.

    python -m engine.quant.perplexity --model models/demo-target --method int4
    python -m engine.quant.perplexity --model models/demo-target --method int4 --no-awq
    python -m engine.quant.perplexity --model /tmp/demo-int4          # a converted checkpoint

The text (default: the demo model's held-out slice, .corpus/heldout.txt.gz,
built by `python -m scripts.demo_models.build_corpus --out .corpus`) is
tokenized whole and cut into non-overlapping windows of seq_len + 1 tokens;
the first `windows` of them are scored (64 x 512 tokens by default: a
fixed slice, the same for every mode). exp(mean next-token cross-entropy).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import QuantConfig
from engine.errors import ConfigError

DEFAULT_TEXT = ".corpus/heldout.txt.gz"


def read_text(path: str | Path) -> str:
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def text_windows(text: str, tokenizer, seq_len: int = 512, num_windows: int | None = 64) -> torch.Tensor:
    """[n, seq_len + 1] token ids: inputs and, shifted by one, their next tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = (len(ids) - 1) // seq_len
    if num_windows is not None:
        n = min(n, num_windows)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    return torch.tensor([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)], dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    from engine.model.dense import forward_full_sequence

    total, count = 0.0, 0
    for w in windows:
        logits = forward_full_sequence(model, w[:-1])
        total += F.cross_entropy(logits.float(), w[1:].to(logits.device), reduction="sum").item()
        count += w.numel() - 1
    return math.exp(total / count)


def quantized_model(model: str, config: QuantConfig, device: str = "auto", dtype: str = "auto"):
    """(LoadedModel, AWQ results): `model` loaded and quantized as the engine would do it."""
    from engine.model.loader import load_model
    from engine.quant import apply_quantization

    loaded = load_model(model, dtype, device)
    wanted = config if loaded.quantization is None or config.method != "none" else loaded.quantization
    results = apply_quantization(loaded.model, wanted, checkpoint=loaded.quantization, calibration_source=loaded.path)
    return loaded, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo-target")
    p.add_argument("--method", default="none", choices=["none", "int8", "int4", "fp8"],
                   help="quantize a float checkpoint at load (a quantized checkpoint brings its own)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-awq", action="store_true")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=64, help="number of windows scored (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    args = p.parse_args(argv)
    from engine.tokenizer import load_tokenizer

    if not Path(args.text).is_file():
        print(f"error: no text at {args.text} (build it: python -m scripts.demo_models.build_corpus --out .corpus)",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    config = QuantConfig(method=args.method, group_size=args.group_size, awq=not args.no_awq)
    try:
        loaded, _ = quantized_model(args.model, config, args.device, args.dtype)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(loaded.path)
    windows = text_windows(read_text(args.text), tokenizer, args.seq_len, args.windows or None)
    ppl = perplexity(loaded.model, windows)
    used = loaded.quantization or config
    result = {
        "model": args.model, "method": used.method, "awq": used.awq if used.method == "int4" else None,
        "tokens": int(windows[:, 1:].numel()), "perplexity": ppl, "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
