"""Incremental detokenization and stop strings for one sequence.

Decoding the whole output each step would cost O(n^2); instead only a short
window is decoded, and text is emitted once it no longer ends in a partial
UTF-8 character (the tokenizer shows those as U+FFFD).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.tokenizer import text_decoder

_PARTIAL = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    stop: list[str]
    text: str = ""  # everything emitted so far; never taken back
    _held: str = ""  # decoded text not emitted yet: it may be the start of a stop string
    _prefix_offset: int = 0
    _read_offset: int = 0
    _tokens: list[int] = field(default_factory=list)
    _decode: Callable[[list[int]], str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._decode = text_decoder(self.tokenizer)

    def add(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Appends tokens; returns (new text, the stop string hit or None).

        With stop strings, the last len(longest stop) - 1 characters are held
        back until they can no longer begin a stop string (or `flush`), so the
        streamed text never shows a piece of a stop string. On a stop hit the
        text ends just before the stop string.
        """
        self._tokens.extend(token_ids)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        if full.endswith(_PARTIAL) or len(full) <= len(prefix):
            return "", None
        new_text = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._append_checking_stop(new_text)

    def flush(self) -> str:
        """Emits the held-back text; call once the sequence has finished for another reason."""
        held, self._held = self._held, ""
        self.text += held
        return held

    def _append_checking_stop(self, new_text: str) -> tuple[str, str | None]:
        if not self.stop:
            self.text += new_text
            return new_text, None
        # The held text is at least the last len(longest) - 1 characters, so a stop string
        # that ends in the new text starts inside this window.
        pending = self._held + new_text
        hits = [(pending.find(s), s) for s in self.stop if s in pending]
        if hits:
            pos, stop = min(hits)
            emit, self._held = pending[:pos], ""
            self.text += emit
            return emit, stop
        keep = max(len(s) for s in self.stop) - 1
        cut = max(len(pending) - keep, 0)
        emit, self._held = pending[:cut], pending[cut:]
        self.text += emit
        return emit, None
