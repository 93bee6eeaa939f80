"""Incremental detokenization and stop strings for one sequence.

Decoding the whole output each step would cost O(n^2); instead only a short
window is decoded, and text is emitted once it no longer ends in a partial
UTF-8 character (the tokenizer shows those as U+FFFD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_PARTIAL = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    stop: list[str]
    text: str = ""
    _prefix_offset: int = 0
    _read_offset: int = 0
    _tokens: list[int] = field(default_factory=list)

    def add(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Appends tokens; returns (new text, the stop string hit or None).

        On a stop hit the text is cut just before the stop string, and the
        new text is what is left of this step's text.
        """
        self._tokens.extend(token_ids)
        prefix = self.tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self._tokens[self._prefix_offset :], skip_special_tokens=True)
        if full.endswith(_PARTIAL) or len(full) <= len(prefix):
            return "", None
        new_text = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._append_checking_stop(new_text)

    def _append_checking_stop(self, new_text: str) -> tuple[str, str | None]:
        if not self.stop:
            self.text += new_text
            return new_text, None
        longest = max(len(s) for s in self.stop)
        # A stop string may straddle the old text and the new: search the old tail too.
        tail_start = max(len(self.text) - longest + 1, 0)
        window = self.text[tail_start:] + new_text
        hits = [(window.find(s), s) for s in self.stop if s in window]
        if not hits:
            self.text += new_text
            return new_text, None
        pos, stop = min(hits)
        cut = tail_start + pos  # index into the combined text
        old_len = len(self.text)
        combined = self.text + new_text
        self.text = combined[:cut]
        return combined[old_len:cut] if cut > old_len else "", stop
