"""IncrementalDetokenizer: text streamed token by token equals the whole decode; stop strings cut it."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Token id = one byte; decodes like a Hugging Face byte-level tokenizer (U+FFFD for broken UTF-8)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode("utf-8"))


class WordTokenizer:
    """Token id = index of a word piece (for stop strings that straddle tokens)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def stream(det: IncrementalDetokenizer, ids, per_step: int = 1):
    """Feeds ids, per_step at a time; returns (deltas, stop hit or None)."""
    deltas = []
    for i in range(0, len(ids), per_step):
        delta, stop = det.add(ids[i : i + per_step])
        deltas.append(delta)
        if stop is not None:
            return deltas, stop
    return deltas, None


def test_multibyte_characters_are_emitted_only_when_complete():
    tok = ByteTokenizer()
    text = "héllo 日本語 ✓!"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, stop=[])
    deltas, stop = stream(det, ids)
    assert stop is None
    assert "".join(deltas) == text == det.text
    assert all("\ufffd" not in d for d in deltas)
    # "日" is three bytes: nothing for the first two, the character with the third.
    start = len("héllo ".encode())
    assert deltas[start : start + 3] == ["", "", "日"]


def test_invalid_bytes_in_the_middle_still_stream_like_the_full_decode():
    tok = ByteTokenizer()
    ids = list(b"ab") + [0xE6] + list(b"cd")  # a broken character followed by more text
    det = IncrementalDetokenizer(tok, stop=[])
    deltas, _ = stream(det, ids)
    assert "".join(deltas) == tok.decode(ids) == "ab\ufffdcd"


def test_real_byte_level_tokenizer_streams_exactly_its_own_decode(make_byte_tokenizer):
    tok = make_byte_tokenizer(full_byte_alphabet=True)
    text = "The naïve café serves 日本語 tokens: fibonacci(n - 1) ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 20
    det = IncrementalDetokenizer(tok, stop=[])
    deltas, _ = stream(det, ids)
    assert "".join(deltas) == text == det.text
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_are_skipped(make_byte_tokenizer):
    tok = make_byte_tokenizer()
    ids = tok.encode("Hello world", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, stop=[])
    deltas, _ = stream(det, [tok.bos_token_id] + ids + [tok.eos_token_id])
    assert "".join(deltas) == "Hello world" == det.text


def test_stop_string_inside_one_token_cuts_before_it():
    tok = WordTokenizer(["Hello", " wor", "ld END here", "!"])
    det = IncrementalDetokenizer(tok, stop=["END"])
    deltas, stop = stream(det, [0, 1, 2, 3])
    assert stop == "END"
    assert det.text == "Hello world "
    assert "".join(deltas) == det.text
    assert len(deltas) == 3  # nothing after the hit


@pytest.mark.parametrize("per_step", [1, 2])
def test_stop_string_straddling_tokens(per_step):
    tok = WordTokenizer(["ab", "c\n", "\nd", "ef"])
    det = IncrementalDetokenizer(tok, stop=["\n\n"])
    deltas, stop = stream(det, [0, 1, 2, 3], per_step)
    assert stop == "\n\n"
    assert det.text == "abc"
    # What was streamed never contains a piece of the stop string.
    assert "".join(deltas) == det.text


def test_earliest_of_several_stop_strings_wins():
    tok = WordTokenizer(["x", "yy STOP2 zz STOP1", "w"])
    det = IncrementalDetokenizer(tok, stop=["STOP1", "STOP2"])
    deltas, stop = stream(det, [0, 1, 2])
    assert stop == "STOP2"
    assert det.text == "xyy "
    assert "".join(deltas) == det.text


def test_stop_string_at_the_very_start():
    tok = WordTokenizer(["##", "rest"])
    det = IncrementalDetokenizer(tok, stop=["##"])
    deltas, stop = stream(det, [0, 1])
    assert stop == "##" and det.text == "" and deltas == [""]


def test_text_that_only_resembles_a_stop_string_is_held_back_then_flushed():
    tok = WordTokenizer(["EN", "D", "E", "N", "d"])
    det = IncrementalDetokenizer(tok, stop=["END!"])
    deltas, stop = stream(det, [0, 1, 2, 3, 4])
    assert stop is None
    # The last len("END!") - 1 characters could still begin "END!": not streamed yet.
    assert "".join(deltas) == det.text == "END"
    assert det.flush() == "ENd"
    assert det.text == "ENDENd"
    assert det.flush() == ""


def test_held_back_text_never_lags_more_than_the_longest_stop():
    tok = ByteTokenizer()
    text = "one two three four five"
    det = IncrementalDetokenizer(tok, stop=["zz", "xyz"])
    for i, byte in enumerate(tok.encode(text)):
        det.add([byte])
        assert det.text == text[: max(i + 1 - 2, 0)]
    assert det.text + det.flush() == text


def test_text_decoder_matches_the_tokenizers_own_decode():
    """The direct call into the Rust tokenizer gives what tokenizer.decode gives, special tokens included."""
    import random
    from pathlib import Path

    from engine.tokenizer import load_tokenizer, text_decoder

    tok = load_tokenizer(Path(__file__).resolve().parents[2] / "models" / "demo-target")
    decode = text_decoder(tok)
    assert decode.func == tok.backend_tokenizer.decode  # the fast path is taken for a stock fast tokenizer
    rng = random.Random(0)
    special = list(tok.all_special_ids)
    for _ in range(300):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))]
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True)
    assert text_decoder(ByteTokenizer())([104, 105]) == "hi"  # anything else keeps its own decode


@pytest.mark.parametrize("per_step", [2, 3, 7])
def test_several_tokens_at_once_give_what_one_by_one_gives_even_with_broken_utf8(per_step):
    tok = ByteTokenizer()
    # Valid text, a lone continuation byte, a cut 3-byte character in the middle, and one cut at the end.
    ids = tok.encode("héllo ") + [0x9C] + tok.encode("日本")[:-1] + tok.encode(" ok ✓") + tok.encode("語")[:2]
    one_by_one = IncrementalDetokenizer(tok, stop=[])
    singles, _ = stream(one_by_one, ids)
    batched = IncrementalDetokenizer(tok, stop=[])
    chunks, _ = stream(batched, ids, per_step=per_step)
    assert "".join(chunks) == "".join(singles) == one_by_one.text == batched.text
    assert "\ufffd" in batched.text and batched.text.endswith("✓")  # the cut last character is held back
