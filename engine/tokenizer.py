"""Loads a checkpoint's tokenizer and its end-of-sequence ids, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path | None) -> Any | None:
    """The Hugging Face tokenizer in `path`, or None when the folder has none."""
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir() or not any(folder.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def eos_token_ids(model_path: Path | None, arch_eos: tuple[int, ...], tokenizer: Any | None) -> set[int]:
    ids = set(arch_eos)
    if model_path is not None and (model_path / "generation_config.json").is_file():
        eos = json.loads((model_path / "generation_config.json").read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
