"""Helpers of the Serve tests: a tiny model with a real tokenizer, a cluster wrapper, app args.

The tiny checkpoint (random tiny-llama weights + a byte-level BPE tokenizer
trained here on a few sentences, with a ChatML template) builds in seconds,
offline, so these tests do not depend on the bundled demo model.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
VOCAB_SIZE = 384

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Ray Serve routes requests to replicas; each replica runs one engine.",
    "Paged attention keeps the key and value cache in fixed-size blocks.",
    "Hello world! How are you today? I am fine, thank you.",
]


def build_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.model.presets import preset_config, save_hf_checkpoint

    folder = Path(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[2],
        pad_token=SPECIAL_TOKENS[0],
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    hf.chat_template = CHAT_TEMPLATE
    cfg = preset_config("tiny-llama")
    cfg.update(vocab_size=len(hf), bos_token_id=0, eos_token_id=2)  # <|im_end|> ends a chat turn
    save_hf_checkpoint(cfg, folder, seed=seed)
    hf.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServeCluster:
    base_url: str

    def deploy(self, name: str, args: dict[str, Any]) -> str:
        """Deploys an app at /<name>; returns its base URL."""
        from ray import serve

        from deployments.app import build_app

        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        return f"{self.base_url}/{name}"

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)


# A deleted app's idle replicas stop after one check instead of Serve's 2 s (each module deletes its app).
QUICK_STOP = {"graceful_shutdown_wait_loop_s": 0.2}


def app_args(model: Path, **overrides: Any) -> dict[str, Any]:
    """Small, CPU-friendly app args for tests."""
    args: dict[str, Any] = {
        "model": str(model),
        "served_model_name": "tiny",
        "cache": {"num_blocks": 256},
        "router": {"publish_interval_s": 0.05},
        "llm_server": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}, **QUICK_STOP},
        "ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}, **QUICK_STOP},
    }
    args.update(overrides)
    return args
