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

        Several tokens at once give exactly what adding them one by one would:
        with one decode when their text is whole, valid characters, else one by one.
        """
        before = len(self._tokens)
        self._tokens.extend(token_ids)
        prefix = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset :])
        new_text = full[len(prefix) :]
        if len(token_ids) <= 1:
            emit = bool(new_text) and not full.endswith(_PARTIAL)
        else:
            # One by one, every emission ends on a whole character, so the next window starts on one:
            # when the new text holds no U+FFFD at all, the pieces one by one join to this same string.
            emit = bool(new_text) and _PARTIAL not in new_text
        if emit:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
            return self._append_checking_stop(new_text)
        if len(token_ids) <= 1:
            return "", None
        del self._tokens[before:]
        text = ""
        for token in token_ids:
            piece, stop = self.add([token])
            text += piece
            if stop is not None:
                return text, stop
        return text, None

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
