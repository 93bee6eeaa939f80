"""Prompts for the load test: short, long, and long-shared-prefix, as completion prompts or chat messages.

No locust import here (it monkey-patches the process), so this is unit-tested
on its own. The text is Python source from the standard library: the bundled
demo model was trained on exactly that kind of text, and any other model
reads it fine.

- short:  a one-line task, a few dozen tokens.
- long:   a fresh window of source code (about `long_tokens` tokens) under a
          unique first line, so no two long prompts share a cached prefix.
- shared: one fixed preamble (about `shared_tokens` tokens, the same for every
          user: a system prompt in chat) and a short unique question after it.
          Every request after the first finds the preamble in the KV cache.
"""

from __future__ import annotations

import random
import string
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

KINDS = ("short", "long", "shared")

# Named mixes; `--prompt-mix` also takes weights, e.g. "short=2,shared=1".
MIXES: dict[str, dict[str, float]] = {
    "mixed": {"short": 0.4, "long": 0.2, "shared": 0.4},
    "short": {"short": 1.0},
    "long": {"long": 1.0},
    "shared": {"shared": 1.0},
}

# Source code runs at roughly this many characters per token in byte-level BPE
# vocabularies (4k demo tokenizer: ~3.3, 150k Qwen: ~4). Prompt sizes are
# approximate; the server's usage.prompt_tokens is the real count.
CHARS_PER_TOKEN = 3.5

SHORT_TASKS = (
    "Write a function that reverses a string.",
    "Write a function that returns the n-th Fibonacci number.",
    "Write a function that checks whether a number is prime.",
    "Write a class for a stack with push, pop and peek.",
    "Write a function that flattens a nested list.",
    "Write a function that counts the words in a text file.",
    "Write a function that merges two sorted lists.",
    "Write a context manager that times a block of code.",
    "Write a function that parses a key=value config line.",
    "Write a generator that yields the lines of a file without newlines.",
)

SHORT_CODE = (
    "def reverse_string(s):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "def is_prime(n):\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "def flatten(items):\n    \"\"\"Flatten a nested list.\"\"\"\n",
    "import os\n\n\ndef count_words(path):\n",
    "def merge_sorted(a, b):\n",
    "import time\nfrom contextlib import contextmanager\n\n\n@contextmanager\ndef timer(name):\n",
    "def parse_line(line):\n    \"\"\"Parse one key=value line.\"\"\"\n",
    "def read_lines(path):\n",
)

SYSTEM_HEAD = (
    "You are a careful Python programmer. Answer with short, correct, idiomatic code. "
    "Follow the style of the module below: its naming, its docstrings, its error handling.\n\n"
)


@cache
def corpus() -> str:
    """A few hundred kB of standard-library source: the raw material of long prompts."""
    import argparse
    import json.decoder
    import json.encoder

    parts = []
    for module in (textwrap, string, argparse, json.encoder, json.decoder, random):
        path = Path(module.__file__)
        if path.suffix == ".py" and path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n\n".join(parts)
    if len(text) < 20_000:  # a stripped install without .py sources
        text = (Path(__file__).read_text(encoding="utf-8") + "\n\n") * 20
    return text


@dataclass(frozen=True)
class Prompt:
    kind: str
    text: str | None = None  # a completion prompt
    messages: tuple[dict[str, str], ...] | None = None  # a chat prompt


class PromptSource:
    """Draws prompts of the configured mix; one per user (each with its own random stream)."""

    def __init__(
        self,
        mix: dict[str, float],
        long_tokens: int = 1000,
        shared_tokens: int = 500,
        seed: int | None = None,
    ) -> None:
        self.kinds = [k for k, w in mix.items() if w > 0]
        self.weights = [mix[k] for k in self.kinds]
        self.long_chars = max(64, int(long_tokens * CHARS_PER_TOKEN))
        self.rng = random.Random(seed)
        self.shared_preamble = shared_preamble(shared_tokens)

    def draw(self, chat: bool) -> Prompt:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        return self.make(kind, chat)

    def make(self, kind: str, chat: bool) -> Prompt:
        nonce = f"{self.rng.getrandbits(48):012x}"
        if kind == "short":
            if chat:
                return Prompt(kind, messages=({"role": "user", "content": self.rng.choice(SHORT_TASKS)},))
            return Prompt(kind, text=self.rng.choice(SHORT_CODE))
        if kind == "long":
            window = self._window()
            if chat:
                content = f"Request {nonce}. Explain what this code does.\n```python\n{window}\n```"
                return Prompt(kind, messages=({"role": "user", "content": content},))
            return Prompt(kind, text=f"# request {nonce}\n{window}")
        if kind == "shared":
            task = self.rng.choice(SHORT_TASKS)
            if chat:
                return Prompt(
                    kind,
                    messages=(
                        {"role": "system", "content": self.shared_preamble},
                        {"role": "user", "content": f"{task} (request {nonce})"},
                    ),
                )
            return Prompt(kind, text=f"{self.shared_preamble}\n\n# Task {nonce}: {task}\n")
        raise ValueError(f"unknown prompt kind {kind!r} (one of {', '.join(KINDS)})")

    def _window(self) -> str:
        text = corpus()
        n = min(self.long_chars, len(text))
        start = self.rng.randrange(0, len(text) - n + 1)
        return text[start : start + n]


def shared_preamble(tokens: int) -> str:
    """The fixed preamble of `shared` prompts: identical in every process, so it is cached once."""
    body = corpus()[: max(0, int(tokens * CHARS_PER_TOKEN) - len(SYSTEM_HEAD))]
    return f"{SYSTEM_HEAD}```python\n{body}\n```"


def parse_mix(spec: str) -> dict[str, float]:
    """"mixed" | "short" | "long" | "shared" | "short=2,long=1,shared=1" -> {kind: weight}."""
    spec = spec.strip()
    if spec in MIXES:
        return dict(MIXES[spec])
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, weight = part.partition("=")
        name = name.strip()
        if not sep or name not in KINDS:
            raise ValueError(
                f"bad prompt mix {spec!r}: use one of {', '.join(MIXES)} or weights like short=2,long=1,shared=1"
            )
        mix[name] = float(weight)
        if mix[name] < 0:
            raise ValueError(f"bad prompt mix {spec!r}: weights must be >= 0")
    if not any(w > 0 for w in mix.values()):
        raise ValueError(f"bad prompt mix {spec!r}: no positive weight")
    return mix


def parse_range(spec: str | float | int, what: str) -> tuple[float, float]:
    """"5" -> (5, 5); "1,3" -> (1, 3)."""
    try:
        values = [float(p) for p in str(spec).split(",")]
    except ValueError:
        raise ValueError(f"bad {what} {spec!r}: a number or a range like 1,3") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or values[0] < 0 or values[1] < values[0]:
        raise ValueError(f"bad {what} {spec!r}: a number or a range like 1,3 (0 <= low <= high)")
    return values[0], values[1]
