"""W3 of shared/BENCHMARK.md: one user, big model, per quantization mode; and each mode's quality.

    python -m bench.quant                  # on one GPU: Llama-3-8B shape, bf16/int8/int4/fp8 (< 4 minutes)
    python -m bench.quant --preset tiny-llama --prompt-len 8 --output-len 4 --repeats 1 \\
        --ppl-model PATH --ppl-text FILE --ppl-windows 2 --ppl-seq-len 32     # CPU smoke run (tests)

1. Kernel check (CUDA): every quantized layer kind on the 8B model's layer
   shapes against its dequantized torch reference (max relative error), and
   the time of one batch-1 product next to bf16 F.linear (GB/s of weights).
2. Speed: the engine's model from "preset:<name>" (random weights drawn on
   the device), quantized at load (int4 by round-to-nearest: speed does not
   depend on the scales), through the real LLMEngine: one request, a
   prompt of 128 random tokens, 128 greedy output tokens (EOS ignored),
   CUDA graphs on. Decode tok/s = (output tokens - 1) / (time from the
   first to the last token); median of --repeats runs. Weight bytes = every
   tensor of the model's state (what a checkpoint holds). The ceiling:
   per token, a decode step reads every weight but the embedding table (one
   row of it) and the KV cache so far; ceiling tok/s = measured copy
   bandwidth / those bytes.
3. Quality: perplexity of the demo model (--ppl-model) on the first
   --ppl-windows windows of its held-out text (needs .corpus; skipped with
   a message if absent) for none / int8 / int4-rtn / int4-awq / fp8.

Modes: bf16 (none), int8, int4-triton (our Triton matvec for decode),
int4-torch (PyTorch's tinygemm int4 kernel), int4-triton-mma (our tensor-core
int4 kernel, engine/quant/int4_mma.py), int4 (the config default, backend
"auto"), fp8 (our kernel for decode), fp8-torch (torch._scaled_mm throughout).
Each int4 backend is its own row, with the kernels its layers actually ran;
the W3 line takes the fastest int4 row and names it. A mode the device cannot
run is reported as skipped. Perplexity modes pin the Triton backend (its
prefill path is the exact dequantized product), so they compare with earlier
runs.

0. Self-check (CUDA, before any timing): each int4 backend on random layers
   of the preset's shapes, against the dequantized reference: the Triton
   matvec and the tensor-core kernel (autotuned, and every config they may
   pick, split-K included) within half a bf16 ulp plus 1e-4 of max |y|;
   tinygemm (offsets rounded to bf16) within 1% relative norm error; then
   replayed 3 times from a CUDA graph, bit-identical to the eager call. A backend that fails is not timed.

Prints a table and the W3 report line; --json writes every figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.device import command_line, device_name, free_memory, graph_seconds_per_call, write_json

from bench.ceiling import measure_device_rates
from bench.step_profile import print_profile, profile_decode
from engine import CacheConfig, ConfigError, EngineConfig, QuantConfig, SamplingParams, SchedulerConfig

SPEED_MODES = "bf16,int8,int4-triton,int4-torch,int4-triton-mma,fp8,fp8-torch"
PPL_MODES = "none,int8,int4-rtn,int4-awq,fp8"


def mode_config(mode: str) -> QuantConfig:
    return {
        "bf16": QuantConfig(),
        "none": QuantConfig(),
        "int8": QuantConfig(method="int8"),
        "int4": QuantConfig(method="int4", awq=False),  # backend "auto": the config default
        "int4-triton": QuantConfig(method="int4", awq=False, backend="triton"),
        "int4-torch": QuantConfig(method="int4", awq=False, backend="torch"),
        "int4-triton-mma": QuantConfig(method="int4", awq=False, backend="triton-mma"),
        "int4-rtn": QuantConfig(method="int4", awq=False, backend="triton"),
        "int4-awq": QuantConfig(method="int4", awq=True, backend="triton"),
        "fp8": QuantConfig(method="fp8"),
        "fp8-torch": QuantConfig(method="fp8", backend="torch"),
    }[mode]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--modes", default=SPEED_MODES, help=f"comma list of: {SPEED_MODES}; or none")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--async-scheduling", choices=("off", "on", "both"), default="off",
        help="EngineConfig.async_scheduling for the speed runs; both: every mode twice (rows MODE and MODE+async)",
    )
    p.add_argument(
        "--decode-folds", action=argparse.BooleanOptionalAction, default=EngineConfig.decode_folds,
        help="EngineConfig.decode_folds for the speed runs (the rotary in attention, int4's norms in its products; "
        "default: the engine's)",
    )
    p.add_argument("--ppl-model", default="models/demo-target")
    p.add_argument("--ppl-text", default=".corpus/heldout.txt.gz")
    p.add_argument("--ppl-modes", default=PPL_MODES, help=f"comma list of: {PPL_MODES}; or none")
    p.add_argument("--ppl-windows", type=int, default=64)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--skip-kernel-check", action="store_true")
    p.add_argument("--skip-self-check", action="store_true")
    p.add_argument("--profile", action="store_true", help="each speed run: GPU time per kernel of one decode step (torch profiler)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----- 1. kernel check --------------------------------------------------------------------


def kernel_check(preset: str, device: torch.device) -> list[dict]:
    """Each layer kind on the preset's projection shapes: error against the reference, batch-1 time."""
    from torch import nn

    from engine.quant.fp8 import Fp8Linear, fp8_unsupported_reason
    from engine.quant.int4 import Int4Linear
    from engine.quant.int8 import Int8Linear

    shapes = _preset_shapes(preset)
    fp8_ok = fp8_unsupported_reason(device) is None
    rows: list[dict] = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (k, n) in shapes.items():
        lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        lin.weight.normal_(0, 0.02, generator=gen)
        variants = {"bf16": lin, "int8": Int8Linear.from_float(lin), "int4-triton": Int4Linear.from_float(lin, 128)}
        tg = Int4Linear.from_float(lin, 128)
        if tg.tinygemm_supported():
            tg.to_tinygemm_()
            variants["int4-torch"] = tg
        mma = Int4Linear.from_float(lin, 128)
        if mma.mma_supported():
            mma.to_mma_()
            variants["int4-triton-mma"] = mma
        if fp8_ok:
            variants["fp8"] = Fp8Linear.from_float(lin)
            f = Fp8Linear.from_float(lin)
            f.use_triton = False
            variants["fp8-torch"] = f
        int4_ref = variants["int4-triton"]  # the same codes: the portable layout's dequantized reference
        ref_layers = {"int4-torch": int4_ref, "int4-triton-mma": int4_ref, "fp8-torch": variants.get("fp8")}
        for vname, layer in variants.items():
            row = {"shape": name, "K": k, "N": n, "variant": vname}
            try:
                errs = []
                for m in (1, 5, 16, 40):
                    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
                    y = layer(x).float()
                    ref_layer = ref_layers.get(vname, layer)
                    if vname == "bf16":
                        ref = x.float() @ lin.weight.float().t()
                    else:
                        ref = ref_layer.forward_reference(x.float())
                    errs.append(((y - ref).norm() / ref.norm()).item())
                row["max_rel_err"] = max(errs)
                x1 = torch.randn(1, k, device=device, dtype=torch.bfloat16, generator=gen)
                seconds = _graph_time(lambda: layer(x1))
                nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
                row.update(us=seconds * 1e6, weight_GBps=nbytes / seconds / 1e9)
            except Exception as exc:  # report and go on: one broken variant must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            msg = row.get("error") or (
                f"err {row['max_rel_err']:.2e}  {row['us']:8.1f} us  {row['weight_GBps']:7.0f} GB/s"
            )
            log(f"  kernel {name:<8} {vname:<15} {msg}")
        del variants, ref_layers, int4_ref, tg, mma, lin
        free_memory()
    return rows


def _preset_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """The projection shapes of one decoder layer and lm_head: name -> (in_features, out_features)."""
    from engine.model.arch import ModelArch
    from engine.model.presets import preset_config

    arch = ModelArch.from_hf_config(preset_config(preset))
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {
        "qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * inter), "down": (inter, h),
        "lm_head": (h, arch.vocab_size),
    }


# ----- 0. self-check of the int4 backends -----------------------------------------------------


def int4_self_check(preset: str, device: torch.device) -> dict[str, str]:
    """backend -> "ok" or what failed: each int4 backend on the preset's "qkv" and "down" shapes."""
    shapes = _preset_shapes(preset)
    out: dict[str, str] = {}
    for backend in ("triton", "torch", "triton-mma"):
        problems = []
        for name in ("qkv", "down"):
            try:
                problems += [f"{name}: {p}" for p in _self_check_layer(backend, *shapes[name], device)]
            except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported as such
                problems.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        out[backend] = "ok" if not problems else "; ".join(problems)[:600]
        log(f"  self-check int4-{backend}: {out[backend]}")
    free_memory()
    return out


def _random_int4_layer(k: int, n: int, device: torch.device):
    """(an Int4Linear [n, k] of group 128 from random bf16 weights, an x [1, k]): the same each call."""
    from torch import nn

    from engine.quant.int4 import Int4Linear

    gen = torch.Generator(device=device).manual_seed(1)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.normal_(0, 0.02, generator=gen)
    return Int4Linear.from_float(lin, 128), torch.randn(1, k, device=device, dtype=torch.bfloat16, generator=gen)


def _self_check_layer(backend: str, k: int, n: int, device: torch.device) -> list[str]:
    from engine.quant import int4_mma, kernels

    layer, x = _random_int4_layer(k, n, device)
    # fp64 (no TF32 however the process set matmul precision), from the very codes the kernels read
    ref = (x.double() @ layer.dequantize(torch.float32).double().t()).float()
    calls = {"autotuned": lambda: layer(x)}
    if backend == "triton":
        ws = kernels.Int4Workspace.for_rows(n, device)
        for c in kernels._int4_matvec_tuned.configs:
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            if cfg["SPLIT_K"] * (cfg["BLOCK_K"] // 128) <= k // 128:
                calls[str(cfg)] = lambda cfg=cfg: kernels.quant_matmul(
                    x, kernels.FMT_INT4, layer.qweight, layer.scales, layer.zeros, None, 128, cfg, ws
                )
    elif backend == "triton-mma":
        layer.to_mma_()
        mws = layer.mma_workspace()
        for c in int4_mma._int4_mma_tuned.configs:
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            if int4_mma._fits(cfg["STEP_GROUPS"], cfg["SPLIT_K"], 128, k // 128):
                calls[str(cfg)] = lambda cfg=cfg: int4_mma.int4_mma_matmul(
                    x, layer.mma_qweight, layer.scales, layer.zeros, None, 128, mws, cfg
                )
    else:
        layer.to_tinygemm_()
    problems = []
    for label, call in calls.items():
        y = call().float()
        if backend != "torch":  # one rounding of an fp32 sum: half a bf16 ulp, plus summation error
            # slack 1e-4 of max |y|: fp32 rounding over K = 14336 (~2e-5 of it), far below a wrong code
            bound = 2.0**-8 * ref.abs() + 1e-4 * ref.abs().max()
            excess = float((((y - ref).abs() - bound) / bound).max())
            if excess > 0:
                problems.append(f"{label} off by {excess:.2f} of its bound")
        else:
            rel = float((y - ref).norm() / ref.norm())
            if rel > 1e-2:
                problems.append(f"{label} relative error {rel:.2e}")
        replays = _graph_replays(call)
        if any(not torch.equal(r.float(), y) for r in replays):
            problems.append(f"{label} differs when replayed from a CUDA graph")
    return problems


def _graph_replays(call, times: int = 3) -> list[torch.Tensor]:
    """The output of `call` captured once in a CUDA graph, after each of `times` replays."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    outs = []
    for _ in range(times):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(out.clone())
    return outs


def _graph_time(fn, repeats: int = 20) -> float:
    """Median seconds of one call, replayed from a CUDA graph of ten calls (no launch overhead)."""
    return graph_seconds_per_call([fn] * 10, repeats)


# ----- 2. speed -----------------------------------------------------------------------------


ASYNC_SUFFIX = "+async"


def speed_runs(modes: list[str], schedule: str) -> list[str]:
    """The speed rows to time: each mode synchronous, with async scheduling, or both."""
    if schedule == "off":
        return modes
    if schedule == "on":
        return [m + ASYNC_SUFFIX for m in modes]
    return [run for m in modes for run in (m, m + ASYNC_SUFFIX)]


def speed_config(preset: str, mode: str, prompt_len: int, output_len: int, async_scheduling: bool,
                 eager: bool = False, decode_folds: bool = EngineConfig.decode_folds) -> EngineConfig:
    """The engine of a speed run: one sequence, a cache just large enough for it."""
    max_len = prompt_len + output_len + 16
    block = 16
    return EngineConfig(
        model=f"preset:{preset}",
        quantization=mode_config(mode),
        max_model_len=max_len,
        enforce_eager=eager,
        async_scheduling=async_scheduling,
        decode_folds=decode_folds,
        cache=CacheConfig(block_size=block, num_blocks=-(-max_len // block) + 8),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=max(256, prompt_len)),
    )


def run_speed(run: str, args: argparse.Namespace, rates, device: torch.device) -> dict:
    from engine.engine import LLMEngine
    from engine.quant import quantized_weight_bytes
    from engine.quant.swap import backend_summary

    config = speed_config(args.preset, run.removesuffix(ASYNC_SUFFIX), args.prompt_len, args.output_len,
                          async_scheduling=run.endswith(ASYNC_SUFFIX), eager=args.eager, decode_folds=args.decode_folds)
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    init_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.arch.vocab_size, (args.prompt_len,), generator=gen).tolist()
    engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    decode, e2e, first = [], [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        e2e.append(time.perf_counter() - start)
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        decode.append((n - 1) / (m.finished_time - m.first_token_time))
        first = first or out.outputs[0].token_ids[:8]
    weight_bytes = quantized_weight_bytes(engine.model)
    arch = engine.arch
    emb = engine.model.embed_tokens.state_dict()
    emb_bytes = sum(t.numel() * t.element_size() for t in emb.values())
    mean_context = args.prompt_len + args.output_len / 2
    per_token = weight_bytes - emb_bytes + emb_bytes // arch.vocab_size + arch.kv_bytes_per_token * mean_context
    ceiling = rates.bandwidth_bytes_per_s / per_token
    tok_s = statistics.median(decode)
    result = {
        "mode": run,
        "tok_s": tok_s,
        "e2e_tok_s": args.output_len / statistics.median(e2e),
        "weight_bytes": weight_bytes,
        "bytes_per_token": per_token,
        "ceiling_tok_s": ceiling,
        "of_ceiling": tok_s / ceiling,
        "init_s": init_s,
        "first_tokens": first,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "kernels": backend_summary(engine.model) if device.type == "cuda" else "cpu reference",
    }
    if args.profile:
        # Where a token's time goes at batch 1: the weight-streaming matmuls against the small kernels.
        result["profile"] = profile_decode(engine, [prompt], steps=16, top=24)
        print_profile(result["profile"])
    del engine
    free_memory()
    return result


# ----- 3. quality -------------------------------------------------------------------------


def run_ppl(mode: str, args: argparse.Namespace, windows: torch.Tensor, device: torch.device) -> dict:
    from engine.quant.perplexity import perplexity, quantized_model

    t0 = time.perf_counter()
    loaded, results = quantized_model(args.ppl_model, mode_config(mode), device=str(device))
    ppl = perplexity(loaded.model, windows)
    out = {"mode": mode, "ppl": ppl, "seconds": time.perf_counter() - t0}
    if results:
        out["awq_error_ratio"] = sum(r.awq_error for r in results) / max(sum(r.rtn_error for r in results), 1e-30)
    del loaded
    free_memory()
    return out


# ----- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"device": device_name(device), "preset": args.preset, "speed": {}, "ppl": {}, "skipped": {}}
    results["versions"] = {"torch": torch.__version__, "triton": _triton_version()}
    log(f"bench.quant on {results['device']} (torch {torch.__version__}, triton {results['versions']['triton']})")
    rates = measure_device_rates(device)
    free_memory()
    results["bandwidth_TBps"] = rates.bandwidth_bytes_per_s / 1e12
    log(f"copy bandwidth {results['bandwidth_TBps']:.2f} TB/s")

    modes = [] if args.modes == "none" else args.modes.split(",")
    failed_backends: dict[str, str] = {}
    if device.type == "cuda" and not args.skip_self_check and any(m.startswith("int4") for m in modes):
        log("self-check of the int4 backends (random layers vs the dequantized reference, CUDA graph replays):")
        results["self_check"] = int4_self_check(args.preset, device)
        failed_backends = {b: why for b, why in results["self_check"].items() if why != "ok"}

    if device.type == "cuda" and not args.skip_kernel_check and args.modes != "none":
        log("kernel check (relative error vs the dequantized reference; batch-1 time from a CUDA graph):")
        results["kernels"] = kernel_check(args.preset, device)

    for mode in speed_runs(modes, args.async_scheduling):
        backend = _int4_backend(mode.removesuffix(ASYNC_SUFFIX))
        if backend in failed_backends:
            results["skipped"][mode] = f"self-check failed: {failed_backends[backend]}"
            log(f"speed {mode}: not timed, the int4-{backend} self-check failed")
            continue
        try:
            r = run_speed(mode, args, rates, device)
        except ConfigError as exc:
            results["skipped"][mode] = str(exc)
            log(f"speed {mode}: skipped ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the others' figures
            results["skipped"][mode] = f"{type(exc).__name__}: {exc}"
            log(f"speed {mode}: FAILED {type(exc).__name__}: {exc}")
            free_memory()
            continue
        results["speed"][mode] = r
        log(
            f"speed {mode}: {r['tok_s']:.1f} tok/s decode, {r['weight_bytes'] / 1e9:.2f} GB weights, "
            f"{r['of_ceiling']:.2f} of ceiling (init {r['init_s']:.1f} s; kernels {r['kernels']}) "
            f"[{time.perf_counter() - t_start:.0f} s]"
        )

    ppl_modes = [] if args.ppl_modes == "none" else args.ppl_modes.split(",")
    if ppl_modes:
        windows = _ppl_windows(args)
        if windows is None:
            results["skipped"]["ppl"] = f"no held-out text at {args.ppl_text}"
        for mode in ppl_modes if windows is not None else []:
            try:
                r = run_ppl(mode, args, windows, device)
            except ConfigError as exc:
                results["skipped"][f"ppl-{mode}"] = str(exc)
                log(f"ppl {mode}: skipped ({exc})")
                continue
            results["ppl"][mode] = r
            log(f"ppl {mode}: {r['ppl']:.3f} ({r['seconds']:.1f} s) [{time.perf_counter() - t_start:.0f} s]")
        if windows is not None:
            results["ppl_tokens"] = int(windows[:, 1:].numel())
    results["seconds"] = time.perf_counter() - t_start
    results["command"] = command_line("bench.quant", argv)
    report(results, args)
    write_json(results, args.json)
    return results


def _int4_backend(mode: str) -> str | None:
    """The int4 backend a speed mode asks for ("auto" resolved as the engine resolves it), or None."""
    from engine.quant.swap import resolve_backend

    if not mode.startswith("int4"):
        return None
    return resolve_backend("int4", mode_config(mode).backend)


def _ppl_windows(args: argparse.Namespace) -> torch.Tensor | None:
    from engine.quant.perplexity import read_text, text_windows
    from engine.tokenizer import load_tokenizer

    if not Path(args.ppl_text).is_file():
        log(f"ppl: skipped, no held-out text at {args.ppl_text} "
            "(build it: python -m scripts.demo_models.build_corpus --out .corpus)")
        return None
    tokenizer = load_tokenizer(args.ppl_model)
    return text_windows(read_text(args.ppl_text), tokenizer, args.ppl_seq_len, args.ppl_windows)


def report(results: dict, args: argparse.Namespace) -> None:
    speed, ppl = results["speed"], results["ppl"]
    log(f"\nW3 batch-1 decode on {results['device']} ({args.preset}, prompt {args.prompt_len}, "
        f"{args.output_len} tokens, copy bandwidth {results['bandwidth_TBps']:.2f} TB/s)")
    log(f"{'mode':<18}{'tok/s':>9}{'x bf16':>8}{'weights GB':>12}{'% bf16':>8}{'ceiling':>9}{'of ceil':>9}"
        "  kernels (layers)")
    base = speed.get("bf16") or speed.get("none") or speed.get("bf16" + ASYNC_SUFFIX)
    for mode, r in speed.items():
        rel = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "-"
        pct = f"{100 * r['weight_bytes'] / base['weight_bytes']:.1f}" if base else "-"
        log(f"{mode:<18}{r['tok_s']:>9.1f}{rel:>8}{r['weight_bytes'] / 1e9:>12.2f}{pct:>8}"
            f"{r['ceiling_tok_s']:>9.0f}{r['of_ceiling']:>9.2f}  {r.get('kernels', '')}")
    for mode, why in results["skipped"].items():
        log(f"{mode:<18} skipped: {why}")
    if ppl:
        log(f"\nperplexity of {args.ppl_model}, {results.get('ppl_tokens', 0)} held-out tokens "
            f"({args.ppl_windows} windows of {args.ppl_seq_len})")
        for mode, r in ppl.items():
            none = ppl.get("none")
            rel = f"{100 * (r['ppl'] / none['ppl'] - 1):+.2f}%" if none else ""
            log(f"{mode:<12}{r['ppl']:>9.3f}  {rel}")

    def best(prefix: str) -> tuple[str, dict] | None:
        found = [(m, r) for m, r in speed.items() if m.removesuffix(ASYNC_SUFFIX) == prefix or m.startswith(prefix + "-")]
        return max(found, key=lambda mr: mr[1]["tok_s"]) if found else None

    def fmt(prefix: str) -> str:
        b = best(prefix)
        return f"{b[1]['tok_s']:.0f}" if b else "n/a"

    def p(mode: str) -> str:
        return f"{ppl[mode]['ppl']:.3f}" if mode in ppl else "n/a"

    int4 = best("int4")
    pct = f"{100 * int4[1]['weight_bytes'] / base['weight_bytes']:.1f}" if int4 and base else "n/a"
    cmd = results["command"]
    picks = ", ".join(f"{pfx} via {best(pfx)[0]}" for pfx in ("bf16", "int4", "fp8") if best(pfx))
    bf16 = best("bf16")  # the fastest bf16 row: async scheduling helps both sides alike
    x_bf16 = f" ({int4[1]['tok_s'] / bf16[1]['tok_s']:.2f}x bf16, target 2.5x)" if int4 and bf16 else ""
    log(
        f"W3: bf16 {fmt('bf16')}, int8 {fmt('int8')}, int4 {fmt('int4')}{x_bf16}, fp8 {fmt('fp8')} tok/s batch 1; "
        f"int4 weights {pct}% of bf16; ppl bf16 {p('none')} int8 {p('int8')} int4-rtn {p('int4-rtn')} "
        f"int4-awq {p('int4-awq')} fp8 {p('fp8')} ({results['device']}, {cmd.strip()}{'; ' + picks if picks else ''})"
    )


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


if __name__ == "__main__":
    main()
