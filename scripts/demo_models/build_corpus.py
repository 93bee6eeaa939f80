"""Build the demo models' training corpus from this interpreter's standard library.

Every machine with Python has its standard library's source, so the corpus
needs no download. The output depends on the Python version (the Lib folder
differs between 3.11 and 3.12), so the corpus is built once, on one machine,
and carried to the GPU as files; manifest.json records what went in.

Output (all gzip-compressed text, documents separated by <|endoftext|>):
  OUT/train.txt.gz    most files, plus chat-formatted examples made from them
  OUT/heldout.txt.gz  every 50th file (by sorted path), plain source only
  OUT/manifest.json   python version, file counts, byte counts, sha256s

    python -m scripts.demo_models.build_corpus --out .corpus
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import sys
import sysconfig

from scripts.demo_models.common import EOT, IM_END, IM_START

# Folders that are not Python source written by people, or that a machine
# does not reliably have: third-party packages, compiled modules, the
# generated code-page tables of encodings/ (walls of \uXXXX escapes that would
# spend tokenizer merges on noise).
EXCLUDE_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "encodings"}
EXCLUDE_PREFIXES = ("config-", "_sysconfigdata")  # machine-specific build data
MAX_FILE_BYTES = 400_000  # a few generated test-data files are huge
HELDOUT_EVERY = 50  # file i is held out when i % 50 == 25: spread over the tree
MAX_TOTAL_BYTES = 40_000_000
CHAT_MIN, CHAT_MAX = 200, 2000  # chars of a function's source to make an example of
SYSTEM = "You are a helpful assistant that writes Python code."


def stdlib_files(root: str) -> list[str]:
    """Sorted relative paths (posix) of the stdlib's .py files we keep."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDE_DIRS and not d.startswith(EXCLUDE_PREFIXES))
        for name in filenames:
            if name.endswith(".py") and not name.startswith(EXCLUDE_PREFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def read_source(path: str) -> str | None:
    """The file's text, or None for files we skip (undecodable, huge, or containing our special tokens)."""
    if os.path.getsize(path) > MAX_FILE_BYTES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, ValueError):
        return None  # the test suite has deliberately mis-encoded files
    if any(tok in text for tok in (EOT, IM_START, IM_END)):
        return None
    return text.replace("\r\n", "\n")


def chat(messages: list[tuple[str, str]]) -> str:
    """ChatML, exactly as the tokenizer's chat template renders it."""
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def chat_examples(relpath: str, text: str, counter: list[int]) -> list[str]:
    """Turn documented top-level functions into chat turns, so the models learn
    the ChatML layout and to end an answer with <|im_end|>."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []  # lib2to3 test data and the like
    module = relpath[:-3].replace("/", ".").removesuffix(".__init__")
    lines = text.splitlines()
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        # Top-level nodes start at column 0, so whole lines are the node's source
        # (without decorators, like ast.get_source_segment, but in linear time).
        src = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        if not doc or not doc.strip() or not src or not CHAT_MIN <= len(src) <= CHAT_MAX or node.name.startswith("_"):
            continue
        first = doc.strip().splitlines()[0].strip()
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        i = counter[0]
        counter[0] += 1
        # A few phrasings, chosen by a running counter so the corpus is deterministic.
        if i % 3 == 0:
            user = f"Write a Python {kind} `{node.name}`. {first}"
            answer = f"```python\n{src}\n```"
        elif i % 3 == 1:
            user = f"How is `{node.name}` implemented in the `{module}` module?"
            answer = f"Here is `{node.name}` from `{module}`:\n\n```python\n{src}\n```"
        else:
            user = f"What does `{module}.{node.name}` do?"
            answer = f"{first}\n\n```python\n{src}\n```"
        msgs = [("user", user), ("assistant", answer)]
        if i % 2 == 0:
            msgs.insert(0, ("system", SYSTEM))
        out.append(chat(msgs))
    return out


def write_gz(path: str, docs: list[str]) -> dict:
    data = EOT.join(docs).encode("utf-8")
    # mtime=0 keeps the .gz bytes identical from run to run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    return {"documents": len(docs), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".corpus")
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    train, heldout, heldout_files, skipped, total = [], [], [], 0, 0
    chats: list[str] = []
    counter = [0]
    for i, rel in enumerate(stdlib_files(args.stdlib)):
        text = read_source(os.path.join(args.stdlib, rel))
        if text is None or not text.strip():
            skipped += 1
            continue
        if total + len(text) > MAX_TOTAL_BYTES:
            break
        total += len(text)
        if i % HELDOUT_EVERY == HELDOUT_EVERY // 2:
            heldout.append(text)
            heldout_files.append(rel)
        else:
            train.append(text)
            chats.extend(chat_examples(rel, text, counter))

    manifest = {
        "source": "Python standard library .py files (sysconfig stdlib path), sorted by path",
        "python_version": sys.version.split()[0],
        "stdlib": args.stdlib,
        "excluded_dirs": sorted(EXCLUDE_DIRS),
        "max_file_bytes": MAX_FILE_BYTES,
        "files_skipped": skipped,
        "heldout_rule": f"file index % {HELDOUT_EVERY} == {HELDOUT_EVERY // 2} (sorted order)",
        "train_files": len(train),
        "chat_examples": len(chats),
        "train": write_gz(os.path.join(args.out, "train.txt.gz"), train + chats),
        "heldout_files": heldout_files,
        "heldout": write_gz(os.path.join(args.out, "heldout.txt.gz"), heldout),
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps({k: v for k, v in manifest.items() if k != "heldout_files"}, indent=1))


if __name__ == "__main__":
    main()
