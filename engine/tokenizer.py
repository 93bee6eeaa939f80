"""Loads a checkpoint's tokenizer and its end-of-sequence ids, offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any


# tokenizer_class values that name transformers' generic tokenizer over tokenizer.json (one class
# in transformers 5: PreTrainedTokenizerFast is TokenizersBackend's alias).
_PLAIN_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: str | Path | None) -> Any | None:
    """The Hugging Face tokenizer in `path`, or None when the folder has none."""
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir() or not any(folder.glob("tokenizer*")):
        return None
    if _tokenizer_class(folder) in _PLAIN_FAST_CLASSES:
        # What AutoTokenizer would build, without importing its registry of every model (half of
        # `from transformers import AutoTokenizer`: seconds of CPU in each replica and engine core).
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _tokenizer_class(folder: Path) -> str | None:
    config = folder / "tokenizer_config.json"
    if not (config.is_file() and (folder / "tokenizer.json").is_file()):
        return None
    try:
        return json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None  # AutoTokenizer then says what is wrong with the folder


def eos_token_ids(model_path: Path | None, arch_eos: tuple[int, ...], tokenizer: Any | None) -> set[int]:
    ids = set(arch_eos)
    if model_path is not None and (model_path / "generation_config.json").is_file():
        eos = json.loads((model_path / "generation_config.json").read_text()).get("eos_token_id")
        ids |= set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text, special tokens skipped: exactly `tokenizer.decode(ids, skip_special_tokens=True)`.

    The incremental detokenizer decodes twice per generated token, and for a fast (Rust)
    tokenizer transformers' Python wrapper costs about twice the decoding itself. Where the
    wrapper adds nothing (its decode methods are the stock ones and it does no clean-up of
    spaces) the Rust tokenizer is called directly; any other tokenizer keeps its own decode.
    """
    if getattr(tokenizer, "backend_tokenizer", None) is not None and _stock_fast_decode(tokenizer):
        return partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


def _stock_fast_decode(tokenizer: Any) -> bool:
    """True when decoding is transformers' own for fast tokenizers: the backend's decode, nothing more."""
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerFast.decode
        and cls._decode is PreTrainedTokenizerFast._decode
        and not tokenizer.clean_up_tokenization_spaces
    )
