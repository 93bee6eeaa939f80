"""A bench run with one of bench/decode_graph_ab.py's variants switched on for the whole process:
what a variant that won the graph A/B gives end to end before it becomes a default. Its figures are
the variant's, not the shipped build's (the JSON names the variant).

    python -m bench.with_variant attn-wide bench.quant --modes int4-triton-mma --ppl-modes none
"""

from __future__ import annotations

import argparse
import importlib
from contextlib import ExitStack
from unittest import mock

from bench.decode_graph_ab import VARIANTS, _patches
from bench.device import command_line, write_json

RUNNABLE = ("bench.quant",)  # benches whose main(argv) returns their result dict


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", choices=[v for v in VARIANTS if _patches(v)])
    ap.add_argument("bench", choices=RUNNABLE)
    args, rest = ap.parse_known_args(argv)
    with ExitStack() as changes:
        for module, name, value in _patches(args.variant):
            changes.enter_context(mock.patch.object(module, name, value))
        result = importlib.import_module(args.bench).main(rest)
    # The bench wrote its JSON under its own command; again, naming the variant and this command.
    result["variant"] = args.variant
    result["command"] = command_line("bench.with_variant", argv)
    json_at = rest.index("--json") + 1 if "--json" in rest else None
    write_json(result, rest[json_at] if json_at else None)
    return result


if __name__ == "__main__":
    main()
