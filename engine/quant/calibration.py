"""Calibration data for activation-aware int4: a fixed text, and the inputs it gives every linear layer.

The text is source code of a few standard-library modules (inspect.getsource),
the same on every machine with the same Python, and none of them among the
demo model's held-out files (models/demo-target/corpus_manifest.json), so
calibrating never sees the text that perplexity is measured on. A model
without a tokenizer is calibrated on random token ids (fixed seed).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from engine.model.dense import forward_full_sequence

CALIBRATION_MODULES = ("textwrap", "functools", "heapq", "argparse", "dataclasses", "string", "shlex", "fnmatch")
CALIBRATION_TOKENS = 2048
CALIBRATION_SEQ_LEN = 512


def calibration_sequences(
    tokenizer: Any | None,
    vocab_size: int,
    num_tokens: int = CALIBRATION_TOKENS,
    seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
) -> list[list[int]]:
    """num_tokens token ids in sequences of at most seq_len: the calibration text, or random ids."""
    ids: list[int] = []
    if tokenizer is not None:
        for name in CALIBRATION_MODULES:  # module by module, only as much text as is needed
            text = inspect.getsource(importlib.import_module(name))
            ids += [t for t in tokenizer.encode(text, add_special_tokens=False) if t < vocab_size]
            if len(ids) >= num_tokens:
                break
    if len(ids) < num_tokens:
        gen = torch.Generator().manual_seed(seed)
        ids += torch.randint(0, vocab_size, (num_tokens - len(ids),), generator=gen).tolist()
    ids = ids[:num_tokens]
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """The input rows [tokens, in_features] of every nn.Linear of `model`, over all sequences.

    Runs our own forward pass (engine.model.dense), so what is captured is
    exactly what the engine will feed the layers. Tensors stay on the
    model's device, in its dtype.
    """
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name):
        def record(module, args):
            x = args[0]
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).detach().clone())

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        for seq in sequences:
            forward_full_sequence(model, seq)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}
