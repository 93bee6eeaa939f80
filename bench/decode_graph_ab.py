"""A/B of the decode graph's fusions at batch 1, on one engine: each variant captures its own
decode graph over the engine's model and KV cache, fed the inputs of the engine's last real decode
step, and is replayed back to back (bench.step_profile.decode_graph_ms's clock), variants taking
turns for --rounds rounds.

Variants: shipped (the engine's defaults: EngineConfig.decode_folds on, the attention's splits
combined by a kernel of their own); 'unfolded' (decode_folds off: the rotary and cache write in a
kernel of their own, each residual add and RMSNorm too); 'norms-only', 'rope-only' (one of the two
folds); 'no-norm' (every add_rmsnorm left out, no folds: a timing only, the most that folding the
norms could save); 'combine-in-kernel' (shipped, with the last split of each head combining them,
arrival counters); 'own-buffers' (the inputs in tensors of their own, not views of run_staged's one
upload buffer); 'attn-N-split(s)' (decode attention's splits forced to N instead of
decode_num_splits' choice, 4 here: 1 needs no combine kernel), 'attn-2x128' (2 splits of
128-token tiles) and 'attn-1x256' (one program a KV head, one 256-token tile, no combine kernel);
'attn-wide' (_DECODE_PRELOAD on: each program's first tile of keys and values read before the PDL
wait, tiles and a split's least share 256 tokens, so one program a KV head here) and
'attn-preload' (the same with 64-token tiles: the shipped splits); 'mma-no-split' (the int4 products
tuned among the configs without split-K only: the tuner times each product alone, the graph chains
them under PDL, where a split's last-arriving sum may cost more than it does alone);
'attn-late-reads' (decode attention reads its step inputs and asks the L2 for its keys and values
only after its PDL wait, as before 2026-12-07 18:00 UTC); 'mma-prefetch-N' (the int4 products
ask the L2 for the first N groups of each row before their PDL wait, instead of PREFETCH_GROUPS, 8);
'no-attention' (attention's kernels left out, the queries passed on: a timing only, the most any
attention change could save).

    python -m bench.decode_graph_ab [--mode int4-triton-mma] [--rounds 5] [--json F]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch

from bench.device import back_to_back_ms, command_line, device_name, write_json
from bench.quant import speed_config
from engine import SamplingParams
from engine.cuda_graphs import DecodeGraphs

VARIANTS = (
    "shipped", "unfolded", "norms-only", "rope-only", "no-norm", "combine-in-kernel", "own-buffers",
    "attn-1-split", "attn-2-splits", "attn-8-splits", "attn-2x128", "attn-late-reads", "attn-preload", "attn-1x256",
    "attn-wide", "mma-no-split", "mma-prefetch-4", "mma-prefetch-16", "no-attention",
)
MMA_PREFETCH_GROUPS = {"mma-prefetch-4": 4, "mma-prefetch-16": 16}
# Decode attention's split policy forced: (splits per (sequence, KV head), tokens per tile).
ATTENTION_SPLITS = {"attn-1-split": (1, 64), "attn-2-splits": (2, 64), "attn-8-splits": (8, 64), "attn-2x128": (2, 128),
                    "attn-1x256": (1, 256)}
# Decode attention's first tile read before its PDL wait (_DECODE_PRELOAD): tiles of this many tokens.
PRELOADED = {"attn-preload": 64, "attn-wide": 256}
FOLDS = {"unfolded": (False, False), "norms-only": (True, False), "rope-only": (False, True), "no-norm": (False, False)}


def _skipped_norm(x, residual, weight, eps):
    """add_rmsnorm's answer (x, the residual) without a kernel: 'no-norm' leaves its launches out."""
    return x, (x if residual is None else residual)


@contextmanager
def _folds(model, norms: bool, rope: bool):
    """The layers' folds set (norms: fused_ops.fold_add_norm; rope: Attention.decode_rope), then as before."""
    held = [(layer.fold_norms, layer.fold_rope) for layer in model.layers]
    for layer in model.layers:
        layer.fold_norms, layer.fold_rope = norms, rope
    try:
        yield
    finally:
        for layer, (n, r) in zip(model.layers, held):
            layer.fold_norms, layer.fold_rope = n, r


def _patches(variant: str) -> list[tuple[object, str, object]]:
    """(module, attribute, value): the engine's module-level switches that the variant is captured with."""
    from engine.attention import triton_paged
    from engine.model import fused_ops, llama
    from engine.quant import int4_mma

    if variant in ATTENTION_SPLITS:
        splits, block_n = ATTENTION_SPLITS[variant]
        return [(triton_paged, "decode_num_splits", lambda *args, **kwargs: splits), (triton_paged, "_DECODE_BLOCK_N", block_n)]
    if variant in PRELOADED:
        return [(triton_paged, "_DECODE_PRELOAD", True), (triton_paged, "_DECODE_PRELOAD_BLOCK_N", PRELOADED[variant])]
    if variant in MMA_PREFETCH_GROUPS:
        return [(int4_mma, "PREFETCH_GROUPS", MMA_PREFETCH_GROUPS[variant])]
    if variant == "mma-no-split":  # autotuned among the batch-1 configs without split-K only
        return [(int4_mma, "_int4_mma_tuned", int4_mma._autotuned([c for c in int4_mma._MMA_CONFIGS if c[2] == 1]))]
    if variant == "attn-late-reads":
        return [(triton_paged, "_DECODE_EARLY_READS", False)]
    if variant == "no-norm":
        return [(fused_ops, "add_rmsnorm", _skipped_norm), (llama, "add_rmsnorm", _skipped_norm)]
    if variant == "no-attention":  # the layers' attention answers its (raw) queries without a kernel
        return [(llama, "paged_attention", lambda q, *args, **kwargs: q)]
    return []


def _capture(engine, variant: str) -> DecodeGraphs:
    live = engine.runner.graphs
    graphs = DecodeGraphs(engine.model, engine.kv_cache, 1, live.block_tables.shape[1])
    if variant == "combine-in-kernel":
        graphs.split_counters = torch.zeros(engine.kv_cache.shape[-2], dtype=torch.int32, device=engine.kv_cache.device)
    if variant == "own-buffers":
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
            setattr(graphs, name, getattr(graphs, name).clone())
    graphs.input_ids.copy_(live.input_ids[:1])
    graphs.positions.copy_(live.positions[:1])
    graphs.slot_mapping.copy_(live.slot_mapping[:1])
    graphs.seq_lens.copy_(live.seq_lens[:1])
    graphs.block_tables.copy_(live.block_tables[:1])
    with ExitStack() as changes:
        if variant in FOLDS:
            changes.enter_context(_folds(engine.model, *FOLDS[variant]))
        for module, name, value in _patches(variant):
            changes.enter_context(mock.patch.object(module, name, value))
        graphs.capture()
    return graphs


def chosen_variants(spec: str | None) -> list[str]:
    """The variants of --variants in VARIANTS' order, 'shipped' first; all of them without it."""
    if spec is None:
        return list(VARIANTS)
    wanted = {v.strip() for v in spec.split(",") if v.strip()}
    unknown = wanted - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS if v == "shipped" or v in wanted]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|"""
    return float((a - ref).abs().max() / ref.abs().max())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--mode", default="int4-triton-mma")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--variants", default=None, help="comma-separated subset of VARIANTS ('shipped' always runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from engine.engine import LLMEngine

    engine = LLMEngine(speed_config(args.preset, args.mode, args.prompt_len, args.output_len, async_scheduling=True))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.arch.vocab_size, (args.prompt_len,), generator=gen).tolist()
    # Stop half way: the graphs' inputs are then those of a decode step at the mean W3 context.
    engine.generate([prompt], SamplingParams(max_tokens=args.output_len // 2, temperature=0.0, ignore_eos=True))
    variants = chosen_variants(args.variants)
    graphs = {v: _capture(engine, v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, g in graphs.items():
            graph = g.graphs[1]
            graph.replay()
            torch.cuda.synchronize()
            times[v].append(back_to_back_ms(graph, args.replays))
    device = torch.device("cuda")
    logits = {v: g.logits[1].float() for v, g in graphs.items()}
    ref = logits["shipped"]
    # Folding the norms rounds differently (the norm's 1 / RMS applied to the product): close, not
    # equal. The rotary in the attention kernel does rope_and_cache's arithmetic: rope-only ~ unfolded.
    unfolded = logits.get("unfolded")
    fold_err = None if unfolded is None else _rel_err(ref, unfolded)
    fold_same_top = None if unfolded is None else bool(torch.equal(ref.argmax(-1), unfolded.argmax(-1)))
    rope_err = None if unfolded is None or "rope-only" not in logits else _rel_err(logits["rope-only"], unfolded)
    split_errs = {v: _rel_err(logits[v], ref) for v in (*ATTENTION_SPLITS, "attn-wide", "mma-no-split") if v in logits}
    equal = {v: bool(torch.equal(logits[v], ref)) for v in ("combine-in-kernel", "attn-late-reads", "attn-preload")
             if v in logits}
    result = {
        "device": device_name(device),
        "command": command_line("bench.decode_graph_ab", argv),
        "mode": args.mode,
        "context": int(graphs["shipped"].seq_lens[0]),
        "ms_per_replay": {v: statistics.median(t) for v, t in times.items()},
        "all_ms": times,
        "logits_equal_shipped": equal,
        "folded_logits_max_rel_err": fold_err,  # shipped (folded) against unfolded
        "folded_argmax_equal_unfolded": fold_same_top,
        "rope_only_logits_max_rel_err": rope_err,
        "attention_splits_logits_max_rel_err": split_errs,
    }
    print(f"decode graph at batch 1, {args.mode}, context {result['context']} on {result['device']}:")
    for v, ms in result["ms_per_replay"].items():
        print(f"  {v:15s} {ms:.4f} ms  (rounds: {', '.join(f'{t:.4f}' for t in times[v])})")
    print("  logits equal shipped's: " + ", ".join(f"{v} {same}" for v, same in equal.items()))
    if fold_err is not None:
        print(f"  shipped (folded) against unfolded: max |diff| / max |logit| {fold_err:.2e}, same argmax {fold_same_top}")
    if rope_err is not None:
        print(f"  rope-only against unfolded: max |diff| / max |logit| {rope_err:.2e}")
    print("  attention's split policy (and mma-no-split) against shipped, max |diff| / max |logit|: "
          + ", ".join(f"{v} {e:.2e}" for v, e in split_errs.items()))
    if args.json:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
