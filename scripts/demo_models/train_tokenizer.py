"""Train the byte-level BPE tokenizer that both demo models share.

Byte-level BPE (GPT-2 style) can encode any text, so the serving stack never
meets an unknown character. The output is a plain Hugging Face tokenizer
folder that transformers.AutoTokenizer loads offline, with a ChatML chat
template:

    python -m scripts.demo_models.train_tokenizer --corpus .corpus/train.txt.gz --out models/demo-tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scripts.demo_models.common import EOT, IM_END, IM_START, SPECIAL_TOKENS, read_text

# ChatML: <|im_start|>role\ncontent<|im_end|>\n ... then the assistant's turn is opened.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_LENGTH = 2048


def train(corpus: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # No prefix space: source code is whitespace-sensitive, and the GPT-2 regex
    # keeps runs of indentation together so BPE can learn them as tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    text = read_text(corpus)
    # The special tokens' text must not become BPE merges: train on the
    # documents with the chat markers blanked out.
    for special in (IM_START, IM_END):
        text = text.replace(special, "\n")
    tok.train_from_iterator(text.split(EOT), trainer=trainer)
    return tok


def write_folder(tok: Tokenizer, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        # <|endoftext|> separates documents in training, so it is what a plain
        # completion ends with; a chat answer ends with <|im_end|>. The models'
        # generation_config.json lists both as eos.
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
                   "additional_special_tokens": [IM_START, IM_END]}, f, indent=2)


def check(out: str) -> None:
    """Load the folder the way any checkpoint's tokenizer is loaded, and round-trip."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    sample = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = hf(sample)["input_ids"]
    assert hf.decode(ids) == sample, "byte-level BPE must round-trip exactly"
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", prompt
    chat_ids = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)
    chat_ids = chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids
    assert chat_ids[0] == hf.convert_tokens_to_ids(IM_START), chat_ids
    print(f"vocab {len(hf)}; {len(sample)} chars -> {len(ids)} tokens; chat prompt {len(chat_ids)} tokens")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".corpus/train.txt.gz")
    ap.add_argument("--manifest", default=None, help="corpus manifest.json to keep beside the tokenizer")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--out", default="models/demo-tokenizer")
    args = ap.parse_args(argv)
    write_folder(train(args.corpus, args.vocab_size), args.out)
    manifest = args.manifest or os.path.join(os.path.dirname(args.corpus), "manifest.json")
    if os.path.exists(manifest):
        shutil.copy(manifest, os.path.join(args.out, "corpus_manifest.json"))
    check(args.out)


if __name__ == "__main__":
    main()
