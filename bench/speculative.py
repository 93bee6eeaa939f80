"""W4 of shared/BENCHMARK.md: speculative decoding with the bundled demo target and draft.

    python bench/speculative.py                 # GPU: bf16, batch 1 and 16, temperature 0 and 0.8
    python bench/speculative.py --remote        # also the draft as its own Serve deployment (starts Ray here)
    python bench/speculative.py --device cpu --dtype float32 --output-len 8 --batch-sizes 1,2 \
        --variants none,draft:2,ngram:2 --runs 1 --prompt-tokens 24        # CPU smoke run

Variants: `none` (no speculation), `none-sync` (no speculation, no async
scheduling; speedups are against the faster of the two in each cell),
`draft:K` (the demo draft on the same device, K proposals per step; its steps
chain on the device, engine/spec/chain.py), `draft-sync:K` (the same,
every step synchronous), `ngram:K` (prompt lookup), `remote:K` (the draft
behind Ray Serve; with --remote); ngram and remote always step synchronously.
Any variant takes the suffix `+unfused` (EngineConfig.fused_norm_linear false: each
norm and projection its own kernels) or `+fused` (true: every step of up to 64
tokens fused, plain decoding too); without one, the engine's default (auto: the
speculative passes fused). E.g. `none+fused,draft:2+unfused`; the plain baseline
of a cell is the fastest of none, none-sync and their suffixed runs.
For each: output tok/s (median of --runs timed runs after a warm-up), engine
steps per run and ms per step, acceptance rate and mean tokens per
sequence-step (accepted proposals + the target's own token). Batch 1 runs --batch1-prompts prompts one after the
other; batch 16 runs 16 prompts at once. Prompts are the first
--prompt-tokens tokens of functions from standard-library modules the demo
models never saw in training (pprint, tarfile, logging: held out).

At temperature 0 every variant's tokens are compared with plain decoding's; in
bf16 an argmax can flip between the verify pass (other kernels) and a
decode step, so the table shows the fraction of sequences that match
exactly (fp32 runs match exactly: --dtype float32).

--interleave builds every variant's engine first and then takes the timed
runs in turns (run 1 of each variant, run 2 of each, ...), so that the host's
drift (batch 1 is bound by the host's speed, which moved plain decoding by up
to 40% between the variants of one sequential run) falls on all alike. On an
H200 it did not: with six engines alive plain decoding slowed to 0.87-0.97 ms
a step while speculative steps did not (BENCHMARKS.md, W4), so W4's figures
come from sequential runs.

Prints a table and the W4 line; --json writes every figure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from bench.device import free_memory
from bench.step_profile import print_profile, profile_decode
from engine import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, SpeculativeConfig
from engine.engine import LLMEngine

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(ROOT / "models/demo-target"))
    p.add_argument("--draft", default=str(ROOT / "models/demo-draft"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--variants", default="none,draft:2,draft:3,draft:4,draft:6,ngram:4,ngram:8")
    p.add_argument("--remote", action="store_true", help="add remote:4, the draft as a Serve deployment (starts Ray)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--batch1-prompts", type=int, default=4, help="prompts run one by one at batch 1")
    p.add_argument("--temperatures", default="0,0.8")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--interleave", action="store_true", help="all engines up at once, timed runs in turns (not with --remote)")
    p.add_argument(
        "--profile", action="store_true",
        help="each variant: where one batch-1 step's time goes (GPU time per kernel, host functions by cProfile)",
    )
    p.add_argument("--profile-steps", type=int, default=24, help="with --profile: decode steps in each measured run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.interleave and args.remote:
        p.error("--interleave does not take --remote")
    return args


def heldout_prompts(tokenizer, n: int, max_tokens: int) -> list[list[int]]:
    """The opening tokens of functions from held-out standard-library modules, deterministic."""
    import logging
    import pprint
    import tarfile

    functions = [
        pprint.PrettyPrinter.__init__, pprint.PrettyPrinter._format, pprint.PrettyPrinter._pprint_dict,
        pprint.PrettyPrinter._safe_repr, pprint.PrettyPrinter.format, pprint.pformat,
        tarfile.TarInfo.frombuf, tarfile.TarInfo._proc_member, tarfile.TarFile.extractall, tarfile.TarFile.add,
        tarfile.TarFile.getmember, tarfile.TarFile.next,
        logging.Logger.callHandlers, logging.Handler.handleError, logging.basicConfig, logging.Formatter.format,
        logging.Logger.findCaller, logging.LoggerAdapter.process,
    ]
    prompts = []
    for fn in functions:
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):  # another Python version may lack one: use the rest
            continue
        prompts.append(list(tokenizer.encode(source, add_special_tokens=False))[:max_tokens])
    return [prompts[i % len(prompts)] for i in range(n)]


PLAIN = ("none", "none-sync")  # no speculation: the default step, and the synchronous one
# Variant suffix -> EngineConfig.fused_norm_linear (no suffix: the engine's default).
FUSION = {"+unfused": False, "+fused": True}


def split_fusion(variant: str) -> tuple[str, dict]:
    """("draft:2", {"fused_norm_linear": False}) for "draft:2+unfused"; ({} for no suffix)."""
    for suffix, on in FUSION.items():
        if variant.endswith(suffix):
            return variant.removesuffix(suffix), {"fused_norm_linear": on}
    return variant, {}
PROFILE_ROOM = 480  # extra context for --profile's steps


def baseline(results: dict, cell: str) -> dict | None:
    """The faster plain-decoding run of a (batch, temperature) cell: speedups are against the best
    the engine does without speculation, not against whichever scheduling is its default."""
    plain = [v for v in results["variants"] if split_fusion(v)[0] in PLAIN]
    runs = [results["variants"][v][cell] for v in plain if cell in results["variants"][v]]
    return max(runs, key=lambda r: r["tok_s"]) if runs else None


def make_engine(args: argparse.Namespace, variant: str, max_num_seqs: int, proposer=None) -> LLMEngine:
    variant, fusion = split_fusion(variant)
    method, _, k = variant.partition(":")
    synchronous = method == "none-sync" or method.endswith("-sync")
    method = method.removesuffix("-sync") if method not in PLAIN else method
    spec = SpeculativeConfig()
    if method not in PLAIN:
        spec = SpeculativeConfig(
            method=method, draft_model=args.draft if method in ("draft", "remote") else None, num_speculative_tokens=int(k)
        )
    # --profile decodes one sequence for longer than a timed run does.
    context = args.prompt_tokens + args.output_len + (PROFILE_ROOM if args.profile else 0)
    config = EngineConfig(
        model=args.target,
        dtype=args.dtype,
        device=args.device,
        max_model_len=context + 32,
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(num_blocks=max_num_seqs * ((context + 48) // 16 + 2) + 1),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096),
        speculative=spec,
        # By default ("auto") the host's step overlaps the GPU's: plain decoding, and the draft's
        # steps chained on the device; "-sync" variants time each without that.
        async_scheduling=False if synchronous else "auto",
        **fusion,
    )
    return LLMEngine(config, proposer=proposer)


def timed_run(engine: LLMEngine, groups: list[list[list[int]]], params: SamplingParams) -> dict:
    """Runs each group of prompts to completion, one group after the other; wall clock of all."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    before = engine.stats()
    steps = 0
    tokens: list[list[int]] = []
    sync()
    start = time.perf_counter()
    for g, prompts in enumerate(groups):
        ids = [f"w4-{g}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            engine.add_request(rid, prompt, params)
        final = {}
        while engine.has_unfinished_requests():
            steps += 1
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
        tokens.extend(final[r].outputs[0].token_ids for r in ids)
    sync()
    seconds = time.perf_counter() - start
    after = engine.stats()
    spec_steps = after.spec_steps - before.spec_steps
    proposed = after.spec_proposed_tokens - before.spec_proposed_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    n = sum(len(t) for t in tokens)
    return {
        "seconds": seconds,
        "tokens": n,
        "tok_s": n / seconds,
        "steps": steps,
        "ms_per_step": seconds / steps * 1e3,
        "acceptance_rate": accepted / proposed if proposed else None,
        "tokens_per_step": (accepted + spec_steps) / spec_steps if spec_steps else None,
        "output": tokens,
    }


def run_variant(args, variant: str, workloads: dict, temps: list[float], proposer_factory=None) -> dict:
    max_seqs = max(len(g) for groups in workloads.values() for g in groups)
    proposer = proposer_factory() if proposer_factory else None
    t0 = time.perf_counter()
    engine = make_engine(args, variant, max_seqs, proposer)
    init_s = time.perf_counter() - t0
    results = {"init_s": init_s}
    for temp in temps:
        params = SamplingParams(max_tokens=args.output_len, temperature=temp, seed=None, ignore_eos=True)
        for batch, groups in workloads.items():
            warm_up(engine, groups, temp)
            runs = [timed_run(engine, groups, params) for _ in range(args.runs)]
            results[f"b{batch}_t{temp:g}"] = median_run(variant, batch, temp, runs)
    if args.profile and 1 in workloads:
        results["profile_b1"] = profile_b1(variant, engine, workloads, args.profile_steps)
    del engine
    free_memory()
    return results


def run_interleaved(args, variants: list[str], workloads: dict, temps: list[float]) -> dict:
    """Every variant's engine at once; per cell, the timed runs in turns (see the module docstring)."""
    max_seqs = max(len(g) for groups in workloads.values() for g in groups)
    engines, results = {}, {}
    for variant in variants:
        t0 = time.perf_counter()
        engines[variant] = make_engine(args, variant, max_seqs)
        results[variant] = {"init_s": time.perf_counter() - t0}
    for temp in temps:
        params = SamplingParams(max_tokens=args.output_len, temperature=temp, seed=None, ignore_eos=True)
        for batch, groups in workloads.items():
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for variant, engine in engines.items():
                warm_up(engine, groups, temp)
            for _ in range(args.runs):
                for variant, engine in engines.items():
                    runs[variant].append(timed_run(engine, groups, params))
            for variant in variants:
                results[variant][f"b{batch}_t{temp:g}"] = median_run(variant, batch, temp, runs[variant])
    if args.profile and 1 in workloads:
        for variant, engine in engines.items():
            results[variant]["profile_b1"] = profile_b1(variant, engine, workloads, args.profile_steps)
    engines.clear()
    free_memory()
    return results


def warm_up(engine: LLMEngine, groups: list[list[list[int]]], temp: float) -> None:
    timed_run(engine, groups[:1], SamplingParams(max_tokens=8, temperature=temp, ignore_eos=True))


def median_run(variant: str, batch: int, temp: float, runs: list[dict]) -> dict:
    """The median of a cell's timed runs (with every run's tok/s), printed as it comes."""
    best = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    best["tok_s_runs"] = [r["tok_s"] for r in runs]
    print(
        f"  {variant:<13} batch {batch:<3} temp {temp:<4g} {best['tok_s']:>9.0f} tok/s  "
        f"{best['ms_per_step']:6.2f} ms/step  accept {_fmt(best['acceptance_rate'])}  "
        f"tokens/step {_fmt(best['tokens_per_step'])}",
        flush=True,
    )
    return best


def profile_b1(variant: str, engine: LLMEngine, workloads: dict, steps: int) -> dict:
    k = int(split_fusion(variant)[0].partition(":")[2] or 0)
    profile = profile_decode(engine, workloads[1][0], steps=steps, top=16, tokens_per_step=k + 1, host_top=24)
    print(f"  {variant}: one batch-1 step, temperature 0")
    print_profile(profile)
    return profile


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def start_remote(args: argparse.Namespace, k: int, vocab_size: int, device: torch.device):
    """Ray + Serve on this machine with the DraftServer deployment; a factory of RemoteDraftProposer."""
    import ray
    from ray import serve

    from deployments.draft_server import DraftServer, RemoteDraftProposer

    cuda = device.type == "cuda"
    ray.init(num_cpus=4, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"location": "NoServer"})  # handles only, no HTTP
    app = DraftServer.options(ray_actor_options={"num_cpus": 1, "num_gpus": 0.25 if cuda else 0}).bind(
        model=args.draft, num_speculative_tokens=k, dtype=args.dtype, device="cuda" if cuda else "cpu",
        block_size=16, max_num_seqs=16, vocab_size=vocab_size, enforce_eager=args.enforce_eager,
    )
    handle = serve.run(app, name="w4-draft", route_prefix=None)
    return lambda: RemoteDraftProposer(handle, k, vocab_size, device)


def stop_remote() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from engine.model.loader import resolve_device
    from engine.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    args.device = str(device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = load_tokenizer(Path(args.target))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    workloads: dict[int, list[list[list[int]]]] = {}
    for b in batches:
        if b == 1:
            prompts = heldout_prompts(tokenizer, args.batch1_prompts, args.prompt_tokens)
            workloads[b] = [[p] for p in prompts]
        else:
            workloads[b] = [heldout_prompts(tokenizer, b, args.prompt_tokens)]
    variants = args.variants.split(",")
    if args.remote:
        variants.append("remote:4")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {"device": name, "dtype": args.dtype, "output_len": args.output_len, "variants": {}}
    print(f"W4 speculative decoding on {name} ({args.dtype}), {args.output_len} output tokens per sequence", flush=True)
    if args.interleave:
        results["variants"] = run_interleaved(args, variants, workloads, temps)
    for variant in [] if args.interleave else variants:
        factory = None
        if variant.startswith("remote"):
            vocab = json.loads((Path(args.target) / "config.json").read_text())["vocab_size"]
            factory = start_remote(args, int(split_fusion(variant)[0].partition(":")[2]), vocab, device)
        try:
            results["variants"][variant] = run_variant(args, variant, workloads, temps, factory)
        finally:
            if factory is not None:
                stop_remote()
    report(results, variants, batches, temps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        slim = json.loads(json.dumps(results, default=str))
        for v in slim["variants"].values():
            for r in v.values():
                if isinstance(r, dict):
                    r.pop("output", None)
        args.json.write_text(json.dumps(slim, indent=2))
    return results


def report(results: dict, variants: list[str], batches: list[int], temps: list[float]) -> None:
    base = any(split_fusion(v)[0] in PLAIN for v in results["variants"])
    print(f"\nW4 on {results['device']} ({results['dtype']})")
    print(f"{'variant':<14}{'batch':>6}{'temp':>6}{'tok/s':>10}{'speedup':>9}{'ms/step':>9}{'accept':>8}{'tok/step':>9}{'match':>7}")
    for variant in variants:
        for temp in temps:
            for b in batches:
                r = results["variants"][variant][f"b{b}_t{temp:g}"]
                ref = baseline(results, f"b{b}_t{temp:g}")
                speed = r["tok_s"] / ref["tok_s"] if ref else None
                match = None
                if ref and temp == 0:
                    match = sum(a == b_ for a, b_ in zip(r["output"], ref["output"])) / len(r["output"])
                r["speedup"], r["exact_match"] = speed, match
                print(
                    f"{variant:<14}{b:>6}{temp:>6g}{r['tok_s']:>10.0f}{_fmt(speed):>9}{r['ms_per_step']:>9.2f}"
                    f"{_fmt(r['acceptance_rate']):>8}{_fmt(r['tokens_per_step']):>9}{_fmt(match):>7}"
                )
    if not base:
        return
    # The W4 line: the bundled pair (the co-located draft) at its best k for batch 1, temperature 0.
    cmd = ("python bench/speculative.py " + " ".join(sys.argv[1:])).strip()
    top = max(batches)
    for kind in ("draft", "ngram", "remote"):
        named = [v for v in variants if v.startswith(kind + ":") and "b1_t0" in results["variants"][v]]
        if not named:
            continue
        best = max(named, key=lambda v: results["variants"][v]["b1_t0"]["speedup"])
        r = results["variants"][best]
        b1, bt = r["b1_t0"], r.get(f"b{top}_t0", {})
        line = (
            f"{_fmt(b1['speedup'])}x at batch 1 temp 0, {_fmt(bt.get('speedup'))}x at batch {top}, "
            f"acceptance {_fmt(b1['acceptance_rate'])}, {_fmt(b1['tokens_per_step'])} tokens/step"
        )
        results.setdefault("lines", {})[kind] = best
        if kind == "draft":
            print(f"W4: {line} ({results['device']}, {cmd}; {best})")
        else:
            print(f"  ({best}: {line})")

if __name__ == "__main__":
    main()
