"""W2 of shared/BENCHMARK.md: streaming requests at fixed concurrency, through Ray Serve over HTTP
and, in the same run, against the engine driven directly (its core in a child process, as in a replica).

    python bench/serve_throughput.py                                   # demo model, device auto
    python bench/serve_throughput.py --model preset:qwen3-0.6b --concurrency 1,16,64,256
    python bench/serve_throughput.py --concurrency 2 --requests-per-level 4 --output-len 8   # CPU smoke run
    python bench/serve_throughput.py --serve-set "" --serve-set max_stream_chunks_per_s=1000,ingress.num_replicas=4 \
        --serve-set env.RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --serve-set ingress_direct_http.port=18000
        # the Serve path once per --serve-set (app args changed by dotted key=value; env.NAME=value
        # starts a fresh Ray with that environment variable; with ingress_direct_http the clients call
        # the ingress replicas' own port instead of Serve's proxy), one direct run

Figures per concurrency: output tok/s, TTFT and inter-token latency p50/p99, errors, and
where the Serve path's TTFT went (the answers' Server-Timing header). The Serve path's
client runs in several processes (--client-procs), so that the client is not the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import itertools
import json
import multiprocessing
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.kept import kept_ratio
from bench.process_cpu import SERVE_ROLES, cpu_seconds_by_role, per_request_ms
from bench.stream_levels import (
    WAY_OUT, LevelResult, client_procs_for, client_share, merge_shares, record_request, run_level,
)
from deployments.ray_env import missing_serve_settings
from engine.cpu_affinity import CpuPlan, pin_process, visible_gpu_index


def client_pool(procs: int) -> ProcessPoolExecutor:
    """The Serve path's client processes (spawn, not fork: this process runs Ray's threads by then).
    On a GPU node they keep off the engine cores' CPUs in every variant: the clients stand for
    other machines, and that CPU is the engine's in both paths."""
    return ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"), initializer=_clients_off_engine_cpus)


def _clients_off_engine_cpus() -> None:
    plan = CpuPlan.for_node()
    if plan is not None:
        pin_process(plan.others)


def make_prompts(n: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (prompt_len,), generator=gen).tolist() for _ in range(n)]


async def run_levels(label: str, levels: list[int], prompts_for, one_request, step_counters) -> list[dict]:
    """Every concurrency level in turn, each after a warm-up wave; one summary per level.
    step_counters: the engine's STEP_COUNTERS now."""
    core_role = {"engine_core": SERVE_ROLES["engine_core"]}  # the direct engine's child, as in a replica
    out = []
    for c in levels:
        await run_level(prompts_for(c, warm_up=True), c, one_request)
        cpu_before, steps_before = cpu_seconds_by_role(core_role), step_counters()
        result = await run_level(prompts_for(c), c, one_request)
        cpu = per_request_ms(cpu_before, cpu_seconds_by_role(core_role), result.requests)
        out.append({
            **result.summary(),
            **{f"cpu_ms_per_request_{role}": ms for role, ms in cpu.items()},
            **step_figures(steps_before, step_counters(), result.requests),
        })
        _print_level(label, out[-1])
    return out


def step_figures(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Between two readings of STEP_COUNTERS: engine steps and steps with prompt tokens per
    request, and sequences per step. Fewer sequences a step and more prompt steps a request on one
    path than the other mean its requests reach the engine more spread out or spend longer outside it."""
    grew = {key: after[key] - before[key] for key in STEP_COUNTERS if key in before and key in after}
    if len(grew) < len(STEP_COUNTERS) or not requests or not grew["steps_total"]:
        return {}
    return {
        "engine_steps_per_request": grew["steps_total"] / requests,
        "engine_prompt_steps_per_request": grew["prompt_steps_total"] / requests,
        "engine_seqs_per_step": grew["step_seqs_total"] / grew["steps_total"],
    }


def _print_level(label: str, summary: dict) -> None:
    core = summary.get("cpu_ms_per_request_engine_core")
    cpu = "" if core is None else f"  engine core {core:.1f} CPU ms/request"
    steps = summary.get("engine_steps_per_request")
    if steps is not None:
        cpu += (f", {steps:.2f} steps/request ({summary['engine_prompt_steps_per_request']:.3f} with prompts),"
                f" {summary['engine_seqs_per_step']:.1f} seqs/step")
    print(
        f"  {label:<7} c={summary['concurrency']:<4} {summary['tok_s']:8.0f} tok/s  errors {summary['errors']}  "
        f"TTFT p50 {summary['ttft_p50_ms']:.1f} ms  ITL p50 {summary['itl_p50_ms']:.2f} ms{cpu}",
        flush=True,
    )


def settled(probe, every_s: float = 0.25, tries: int = 12, keys: tuple[str, ...] | None = None):
    """The probe's reading once two in a row agree on `keys` (None: all): replicas publish every
    publish_interval_s. Counters that tick while idle (loop lag checks) are left out of `keys`."""
    same = (lambda a, b: a == b) if keys is None else (lambda a, b: all(a[k] == b[k] for k in keys))
    last = probe()
    for _ in range(tries):
        time.sleep(every_s)
        now = probe()
        if same(now, last):
            return now
        last = now
    return last


# EngineStats' step counters, as the engine gives them and (prefixed llm_replica_engine_) in /metrics.
STEP_COUNTERS = ("steps_total", "prompt_steps_total", "step_seqs_total")
# Counters of /metrics that a level's summary reads the change of: the LLM replicas' summed; the
# ingress ones are per ingress replica (a scrape is answered by one of several), so they are read
# under the answering replica's label and count only when both readings came from the same one.
FIRST_TOKEN_COUNTERS = ("llm_replica_first_token_wait_seconds_total", "llm_replica_first_tokens_total")
SERVE_COUNTERS = (
    *FIRST_TOKEN_COUNTERS,
    "llm_replica_event_loop_lag_seconds_total",
    "llm_replica_event_loop_lag_checks_total",
    "llm_replica_gc_pause_seconds_total",
    "llm_replica_gc_full_pause_seconds_total",
    "llm_replica_gc_full_collections_total",
    *(f"llm_replica_engine_{key}" for key in STEP_COUNTERS),
)
INGRESS_COUNTERS = (
    "llm_ingress_event_loop_lag_seconds_total",
    "llm_ingress_event_loop_lag_checks_total",
    "llm_ingress_gc_pause_seconds_total",
    "llm_ingress_gc_full_collections_total",
)


def parse_counters(metrics_text: str) -> dict[str, float]:
    """SERVE_COUNTERS summed over their labels (the LLM replicas), and INGRESS_COUNTERS keyed
    "name{replica}" by the ingress replica that answered."""
    totals = dict.fromkeys(SERVE_COUNTERS, 0.0)
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = line.rsplit(" ", 1)[-1]
        if name in totals:
            totals[name] += float(value)
        elif name in INGRESS_COUNTERS:
            replica = line.partition('replica="')[2].partition('"')[0]
            totals[f"{name}{{{replica}}}"] = float(value)
    return totals


def replica_wait(before: dict[str, float], after: dict[str, float]) -> dict:
    """Between two readings: the mean arrival-at-replica -> first token, and the mean lag of the LLM
    replicas' and an ingress replica's event loops (the wait a request sees there before our code runs;
    nan for the ingress when the two readings came from different ingress replicas)."""

    def mean_ms(seconds: str, count: str) -> float:
        n = _delta(before, after, count)
        return _delta(before, after, seconds) / n * 1e3 if n else float("nan")

    ingress = [k.partition("{")[2] for k in after if k.startswith(INGRESS_COUNTERS[1] + "{")]
    suffix = "{" + ingress[0] if ingress else ""
    return {
        "replica_first_tokens": after["llm_replica_first_tokens_total"] - before["llm_replica_first_tokens_total"],
        "replica_ttft_mean_ms": mean_ms("llm_replica_first_token_wait_seconds_total", "llm_replica_first_tokens_total"),
        "replica_loop_lag_mean_ms": mean_ms("llm_replica_event_loop_lag_seconds_total", "llm_replica_event_loop_lag_checks_total"),
        "ingress_loop_lag_mean_ms": mean_ms(INGRESS_COUNTERS[0] + suffix, INGRESS_COUNTERS[1] + suffix),
        # The garbage collector's stops of the LLM replicas' (summed) and that ingress replica's processes.
        "replica_gc_pause_ms": _delta(before, after, "llm_replica_gc_pause_seconds_total") * 1e3,
        "replica_gc_full_pause_ms": _delta(before, after, "llm_replica_gc_full_pause_seconds_total") * 1e3,
        "replica_gc_full_collections": _delta(before, after, "llm_replica_gc_full_collections_total"),
        "ingress_gc_pause_ms": _delta(before, after, INGRESS_COUNTERS[2] + suffix) * 1e3,
        "ingress_gc_full_collections": _delta(before, after, INGRESS_COUNTERS[3] + suffix),
    }


def _engine_steps(reading: dict[str, float]) -> dict[str, float]:
    """STEP_COUNTERS out of a /metrics reading (summed over the LLM replicas)."""
    return {key: reading[f"llm_replica_engine_{key}"] for key in STEP_COUNTERS if f"llm_replica_engine_{key}" in reading}


def _delta(before: dict[str, float], after: dict[str, float], counter: str) -> float:
    """How much a counter grew between two readings (nan: not in both)."""
    return after[counter] - before[counter] if counter in before and counter in after else float("nan")


# ----- engine direct ------------------------------------------------------------------


class DirectEngine:
    """The engine without Serve or HTTP, driven from this process on a loop of its own, a few
    levels at a time (so that --interleave can keep it up between Serve levels).

    loop "process": its core in a child process, as each LLM replica runs it (engine_loop: auto),
    so that the two paths differ only by Serve and HTTP; "thread": stepped in a thread of this
    process, which shares its GIL with the client."""

    def __init__(self, app_args: dict, output_len: int, loop: str) -> None:
        from deployments.config import parse_app_config
        from engine import AsyncLLMEngine, SamplingParams
        from engine.core_process import EngineCoreClient

        app = parse_app_config(app_args)
        # As in an LLM replica: the core on its CPU of the node's plan, this process (the replica's
        # counterpart) off those CPUs while it drives a level, and back on every CPU between levels,
        # so Ray's processes, started from here, never inherit it (engine/cpu_affinity.py).
        self._plan = app.cpu_plan() if loop == "process" else None
        if loop == "process":
            core_cpu = None if self._plan is None else self._plan.core_cpu(visible_gpu_index())
            # The thread count Ray gives a replica of this many CPUs; on a busy CPU more torch
            # threads would spin against the client's.
            with environment({"OMP_NUM_THREADS": str(max(1, int(app.llm_server.ray_actor_options.num_cpus)))}):
                self._engine = EngineCoreClient(app.to_engine_config(core_cpu))
        else:
            self._engine = AsyncLLMEngine(app.to_engine_config())
        self._params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()

    async def _one(self, prompt: list[int], result: LevelResult) -> None:
        start = time.perf_counter()
        arrivals: list[float] = []
        tokens = 0
        async for out in self._engine.generate(prompt, self._params, f"direct-{next(self._ids)}"):
            n = len(out.outputs[0].new_token_ids)
            if n:
                arrivals.append(time.perf_counter())
                tokens += n
        record_request(result, start, arrivals, tokens)

    def run_levels(self, label: str, levels: list[int], prompts_for) -> list[dict]:
        run = run_levels(label, levels, prompts_for, self._one, self._step_counters)
        if self._plan is None:
            return self._loop.run_until_complete(run)
        every = os.sched_getaffinity(0)
        pin_process(self._plan.others)
        try:
            return self._loop.run_until_complete(run)
        finally:
            pin_process(every)

    def _step_counters(self) -> dict[str, float]:
        stats = self._engine.stats()
        return {key: getattr(stats, key) for key in STEP_COUNTERS}

    def close(self) -> None:
        self._engine.shutdown()
        self._loop.close()


def bench_direct(
    app_args: dict, levels: list[int], prompts_for, output_len: int, loop: str, label: str = "direct"
) -> list[dict]:
    """Every level on a fresh engine, which is shut down after."""
    direct = DirectEngine(app_args, output_len, loop)
    try:
        return direct.run_levels(label, levels, prompts_for)
    finally:
        direct.close()


# ----- through Ray Serve over HTTP ----------------------------------------------------


def bench_serve(
    pool, procs: int, base_url: str, client_url: str, model: str, levels: list[int], prompts_for, output_len: int
) -> list[dict]:
    """A warm-up, then each level; each summary also says how long requests waited once on a replica.

    client_url: where the clients send their requests (Serve's proxy, or the ingress replicas' own
    port with ingress_direct_http); base_url: the proxy, read for the replicas' counters."""

    def probe() -> dict[str, float]:
        with urllib.request.urlopen(base_url + "/metrics", timeout=30) as resp:
            return parse_counters(resp.read().decode())

    def level(c: int, warm_up: bool = False) -> LevelResult:
        prompts = prompts_for(c, warm_up)
        n = max(1, min(procs, c))
        shares = [prompts[i::n] for i in range(n)]
        concurrency = [c // n + (i < c % n) for i in range(n)]
        parts = pool.map(client_share, [client_url] * n, [model] * n, shares, concurrency, [output_len] * n)
        return merge_shares(c, list(parts))

    level(max(4, procs), warm_up=True)  # which also starts every client process (spawned on first use)
    out = []
    for c in levels:
        level(c, warm_up=True)
        before, cpu_before = settled(probe, keys=FIRST_TOKEN_COUNTERS), cpu_seconds_by_role()
        result = level(c)
        cpu = per_request_ms(cpu_before, cpu_seconds_by_role(), result.requests)
        after = settled(probe, keys=FIRST_TOKEN_COUNTERS)
        out.append({
            **result.summary(),
            **{f"cpu_ms_per_request_{role}": ms for role, ms in cpu.items()},
            **step_figures(_engine_steps(before), _engine_steps(after), result.requests),
        })
        out[-1].update(replica_wait(before, after))
        _print_level("serve", out[-1])
    return out


def start_serve(num_gpus: int, env: dict[str, str]) -> str:
    """A local Ray with Serve's HTTP proxy on a free port; `env` is set for every Ray process."""
    import ray
    from ray import serve

    port = _free_port()
    # Ray's processes inherit the environment of the raylet that ray.init starts here
    # (Serve reads settings such as RAY_SERVE_THROUGHPUT_OPTIMIZED at import).
    with environment({**missing_serve_settings({**os.environ, **env}), **env}):
        ray.init(num_cpus=8, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set, for the child processes started inside; restored after."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def stop_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run_app(app_args: dict) -> None:
    """Deploys (or replaces) the app with these args and waits until it is ready."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(app_args), name="llm", route_prefix="/")


def variant_args(app_args: dict, sets: str) -> tuple[dict, dict[str, str]]:
    """app_args with `key.path=value,key=value` applied (yaml values), and the `env.NAME=value` items."""
    import copy

    import yaml

    from loadtest.serve_local import set_dotted

    args, env = copy.deepcopy(app_args), {}
    for item in filter(None, sets.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad --serve-set item {item!r}: use key.path=value or env.NAME=value")
        key = key.strip()
        if key.startswith("env."):
            env[key.removeprefix("env.")] = value
        else:
            set_dotted(args, key, yaml.safe_load(value))
    return args, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo-target")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--requests-per-level", type=int, default=0, help="0: 16 x concurrency up to 512, at least 4 x concurrency")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int, default=16384)
    p.add_argument(
        "--serve-set", action="append", default=None, metavar="K=V,K=V",
        help="one Serve variant: app args changed by dotted key=value pairs, env.NAME=value for Ray's environment "
        "(repeat for several; default: one, unchanged)",
    )
    p.add_argument(
        "--app-set", default="", metavar="K=V,K=V",
        help="app args changed by dotted key=value pairs for both paths, the direct engine's and Serve's "
        "(e.g. num_scheduler_steps=8)",
    )
    p.add_argument(
        "--direct-loop", choices=("process", "thread"), default="process",
        help="the direct engine's core: in a child process as in a replica (default), or a thread of the client's process",
    )
    p.add_argument(
        "--direct-twice", action="store_true",
        help="also drive the engine directly after the Serve variants; the baseline is the mean of both runs",
    )
    p.add_argument(
        "--interleave", action="store_true",
        help="per level: direct, Serve, direct, both engines up all along (one --serve-set; see --rounds); "
        "the baseline is the mean of the direct passes",
    )
    p.add_argument(
        "--rounds", type=int, default=1,
        help="with --interleave: (direct, Serve) passes per level before the last direct one; each path's "
        "figure is the mean of its passes",
    )
    p.add_argument(
        "--compile-pass", action=argparse.BooleanOptionalAction, default=True,
        help="first, an untimed direct pass with the warm-up prompts: on a fresh host Triton compiles a kernel variant "
        "the first time a batch shape needs it (minutes in all), which would slow whichever path runs first",
    )
    p.add_argument("--client-procs", type=int, default=0, help="client processes for the Serve path (0: one per 32 streams, at most 8)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.interleave and len(args.serve_set or []) > 1:
        p.error("--interleave takes one --serve-set")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    cuda = torch.cuda.is_available()
    max_seqs = min(args.max_num_seqs, max(levels))
    app_args = {
        "model": args.model,
        "served_model_name": "bench",
        "max_model_len": args.prompt_len + args.output_len + 64,
        # A fixed pool (1 GiB for the demo model): the direct engine and the Serve replica
        # run one after the other, and the second must not size itself from what the first left.
        "cache": {"num_blocks": args.num_kv_blocks},
        "scheduler": {"max_num_seqs": max_seqs, "max_num_batched_tokens": 8192},
        "llm_server": {
            "max_ongoing_requests": max(levels) + 8,
            "max_queued_requests": 4 * max(levels) + 64,
            "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if cuda else 0},
        },
        # Chunking as shipped (max_stream_chunks_per_s); the SSE work spread over four ingress replicas,
        # as serve_config.yaml suggests for a GPU node under heavy streaming load.
        "ingress": {"num_replicas": 4, "max_ongoing_requests": 4 * max(levels) + 64},
    }
    app_args, app_env = variant_args(app_args, args.app_set)
    if app_env:
        raise SystemExit("--app-set takes app args only; Ray's environment goes in --serve-set")
    vocab_size = _vocab_size(args.model)
    # At least 8 requests per stream up to 64 streams: with fewer, a level lasts under a second at 16
    # streams, and connection set-up and the last stragglers weigh as much as the steady state.
    n_for = (lambda c: args.requests_per_level or max(4 * c, min(16 * c, 512)))
    # Before each level, one request per stream with other prompts (no prefix-cache hits in the timed
    # part): kernels first compiled for a batch size, connections opened and a cold step loop are not
    # counted against whichever path happens to run first.
    # batch 1: other prompts for a second pass over an engine that has cached the first's.
    def prompts_for(c: int, warm_up: bool = False, batch: int = 0) -> list[list[int]]:
        seed = c + 100_000 * batch
        if warm_up:
            return make_prompts(c, args.prompt_len, vocab_size, seed=1_000_000 + seed)
        return make_prompts(n_for(c), args.prompt_len, vocab_size, seed=seed)

    if args.compile_pass:
        print("untimed pass (compiles, fills Triton's cache):", flush=True)
        warm_only = lambda c, warm_up=False: prompts_for(c, warm_up=True)  # noqa: E731
        bench_direct(app_args, levels, warm_only, args.output_len, args.direct_loop, label="untimed")
    if args.interleave:
        direct, variants, procs = interleaved(args, app_args, levels, prompts_for, cuda)
        return finish(args, argv, cuda, direct, variants, procs)
    print("engine direct:", flush=True)
    direct = bench_direct(app_args, levels, prompts_for, args.output_len, args.direct_loop)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    procs = args.client_procs or client_procs_for(max(levels))
    variants = []
    env_now: dict[str, str] | None = None
    with client_pool(procs) as pool:
        for sets in args.serve_set or [""]:
            variant_app_args, env = variant_args(app_args, sets)
            if env != env_now:  # Ray's own settings: a fresh Ray for this variant
                if env_now is not None:
                    stop_serve()
                base_url, env_now = start_serve(1 if cuda else 0, env), env
            print(f"through Ray Serve over HTTP{f' ({sets})' if sets else ''}, {procs} client processes:", flush=True)
            run_app(variant_app_args)
            direct_http = variant_app_args.get("ingress_direct_http")
            client_url = base_url if direct_http is None else f"http://{direct_http.get('host', '127.0.0.1')}:{direct_http['port']}"
            variants.append({
                "sets": sets,
                "client_url": client_url,
                "levels": bench_serve(pool, procs, base_url, client_url, "bench", levels, prompts_for, args.output_len),
            })
    direct_runs = [direct]
    if args.direct_twice:
        # The host's speed drifts within a run (and between runs far more): the baseline is the
        # mean of a direct run before and one after the Serve variants (Serve idles meanwhile).
        print("engine direct, again:", flush=True)
        direct_runs.append(bench_direct(app_args, levels, prompts_for, args.output_len, args.direct_loop))
        direct = mean_direct(direct_runs)
    return finish(args, argv, cuda, direct, variants, procs)


def finish(args: argparse.Namespace, argv: list[str] | None, cuda: bool, direct: list[dict], variants: list[dict], procs: int) -> dict:
    """Reports, writes --json, stops Serve; returns every figure."""
    results = {
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "model": args.model,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "client_procs": procs,
        "direct_loop": args.direct_loop,
        "app_set": args.app_set,
        "direct": direct,
        "serve": variants[0]["levels"],
        "serve_variants": variants,
    }
    report(results, argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    stop_serve()
    return results


def interleaved(args: argparse.Namespace, app_args: dict, levels: list[int], prompts_for, cuda: bool):
    """Per level: --rounds times (direct, Serve), then direct once more, with both engines up all
    along, so that the host's drift (which moved the direct figures by up to 45% between passes of
    one level) falls on both paths alike. Each pass takes prompts neither engine has cached. One
    Serve variant. Returns (direct as the mean of its passes, variants with Serve's mean, procs)."""
    sets = (args.serve_set or [""])[0]
    variant_app_args, env = variant_args(app_args, sets)
    procs = args.client_procs or client_procs_for(max(levels))
    direct_engine = DirectEngine(app_args, args.output_len, args.direct_loop)
    direct_levels, serve_levels = [], []
    try:
        with client_pool(procs) as pool:
            base_url = start_serve(1 if cuda else 0, env)
            run_app(variant_app_args)
            direct_http = variant_app_args.get("ingress_direct_http")
            client_url = base_url if direct_http is None else f"http://{direct_http.get('host', '127.0.0.1')}:{direct_http['port']}"
            print(f"per level, {args.rounds} x (direct, Serve over HTTP{f' ({sets})' if sets else ''}), direct "
                  f"({procs} client processes):", flush=True)
            for c in levels:
                direct_passes, serve_passes = [], []
                for r in range(args.rounds + 1):
                    fresh = functools.partial(prompts_for, batch=r)
                    direct_passes += direct_engine.run_levels("direct", [c], fresh)
                    if r < args.rounds:
                        serve_passes += bench_serve(pool, procs, base_url, client_url, "bench", [c], fresh, args.output_len)
                direct_levels += mean_direct([[p] for p in direct_passes])
                serve_levels += mean_direct([[p] for p in serve_passes])
    finally:
        direct_engine.close()
    variants = [{"sets": sets, "client_url": client_url, "levels": serve_levels}]
    return direct_levels, variants, procs


def mean_direct(runs: list[list[dict]]) -> list[dict]:
    """Per level: the first run's figures with tok/s the mean over the runs (each run's in tok_s_runs)."""
    out = []
    for per_run in zip(*runs):
        level = dict(per_run[0])
        level["tok_s_runs"] = [r["tok_s"] for r in per_run]
        level["tok_s"] = sum(level["tok_s_runs"]) / len(per_run)
        out.append(level)
    return out


def _vocab_size(model: str) -> int:
    from engine.model.loader import PRESET_PREFIX
    from engine.model.presets import preset_config

    if model.startswith(PRESET_PREFIX):
        return preset_config(model[len(PRESET_PREFIX) :])["vocab_size"]
    return json.loads((Path(model) / "config.json").read_text())["vocab_size"]


def report(results: dict, argv: list[str] | None) -> None:
    nan = float("nan")
    print(f"\nW2 serving on {results['device']} ({results['model']}, prompt {results['prompt_len']}, "
          f"{results['client_procs']} client processes for Serve, "
          f"output {results['output_len']} tokens, streaming)")
    serve_runs = {s["concurrency"]: s.get("tok_s_runs", []) for s in results["serve_variants"][0]["levels"]}
    for d in results["direct"]:
        if len(d.get("tok_s_runs", [])) > 1:
            line = f"  c={d['concurrency']}: direct passes " + ", ".join(f"{t:.0f}" for t in d["tok_s_runs"]) + " tok/s"
            between = serve_runs.get(d["concurrency"])
            if between:
                line += "; Serve passes between them " + ", ".join(f"{t:.0f}" for t in between)
            if between and len(d["tok_s_runs"]) == len(between) + 1:
                kept = kept_ratio(d["tok_s_runs"], between)
                line += (f"; each Serve pass against the direct ones around it: {kept.paired_mean:.0%} kept "
                         f"(95% interval {kept.low:.0%}-{kept.high:.0%})")
            print(line)
    for variant in results["serve_variants"]:
        if variant["sets"]:
            print(f"Serve variant: {variant['sets']}")
        print(f"{'conc':>5}{'direct tok/s':>14}{'serve tok/s':>13}{'kept':>7}{'TTFT p50/p99 ms':>18}{'ITL p50/p99 ms':>17}"
              f"{'errors':>8}{'TTFT mean: client / on replica / direct ms':>44}")
        for d, s in zip(results["direct"], variant["levels"]):
            kept = s["tok_s"] / d["tok_s"] if d["tok_s"] else 0.0
            print(f"{d['concurrency']:>5}{d['tok_s']:>14.0f}{s['tok_s']:>13.0f}{kept:>7.0%}"
                  f"{s['ttft_p50_ms']:>9.1f}/{s['ttft_p99_ms']:<8.1f}{s['itl_p50_ms']:>8.2f}/{s['itl_p99_ms']:<8.2f}{s['errors']:>6}"
                  f"{s['ttft_mean_ms']:>20.1f} / {s.get('replica_ttft_mean_ms', float('nan')):.1f} / {d['ttft_mean_ms']:.1f}")
        print("  where the Serve TTFT went (means, ms; Server-Timing): client | ingress handler "
              "[= body read and checks + call -> first output [= routing + replica -> first token]] | the rest")
        for s in variant["levels"]:
            handler, ingress, route, replica, router, accepted = (
                s.get(f"server_{k}_mean_ms", float("nan"))
                for k in ("handler", "ingress", "route", "replica", "router", "accepted")
            )
            print(f"  c={s['concurrency']:<5} {s['ttft_mean_ms']:8.1f} | {handler:8.1f} [= {handler - ingress:6.1f} + {ingress:7.1f}"
                  f" [= {route:6.1f} + {replica:6.1f}]] | {s['ttft_mean_ms'] - handler:8.1f}"
                  f"   routing = {router:.1f} until the request router ran + {route - router:.1f} after;"
                  f" the replica's acceptance back in the ingress at {accepted:.1f}")
        print("  the rest: before the ingress handler ran (HTTP proxy, routing to the ingress, its queue) and the way back out")
        print("  a stream's way out (means, ms; the end-timing comment): engine's finish -> last output on the replica"
              " | -> the ingress's last write | -> [DONE] at the client")
        for s in variant["levels"]:
            print(f"  c={s['concurrency']:<5} " + " | ".join(
                f"{s.get(f'server_{name}_mean_ms', nan):8.2f}" for name, _, _ in WAY_OUT))
        print("  event-loop lag, mean ms (the wait a ready callback sees): LLM replica | one ingress replica")
        for s in variant["levels"]:
            print(f"  c={s['concurrency']:<5} {s.get('replica_loop_lag_mean_ms', nan):8.2f} | "
                  f"{s.get('ingress_loop_lag_mean_ms', nan):8.2f}")
        print("  garbage collection during the level, ms stopped (full collections): LLM replicas | one ingress replica")
        for s in variant["levels"]:
            print(f"  c={s['concurrency']:<5} {s.get('replica_gc_pause_ms', nan):8.1f} ({s.get('replica_gc_full_collections', nan):.0f}) | "
                  f"{s.get('ingress_gc_pause_ms', nan):8.1f} ({s.get('ingress_gc_full_collections', nan):.0f})")
        print("  CPU ms per request, by process role (all replicas of a role summed): " + ", ".join(SERVE_ROLES))
        for s in variant["levels"]:
            cpu = [s.get(f"cpu_ms_per_request_{role}", float("nan")) for role in SERVE_ROLES]
            print(f"  c={s['concurrency']:<5} " + "  ".join(f"{role} {ms:6.1f}" for role, ms in zip(SERVE_ROLES, cpu)))
        print("  the engine's steps per request (of them with prompt tokens) and sequences per step: direct | Serve")
        for d, s in zip(results["direct"], variant["levels"]):
            print(f"  c={s['concurrency']:<5} " + " | ".join(
                f"{x.get('engine_steps_per_request', nan):6.2f} ({x.get('engine_prompt_steps_per_request', nan):.3f}), "
                f"{x.get('engine_seqs_per_step', nan):5.1f}" for x in (d, s)))
    d, s = results["direct"][-1], results["serve"][-1]
    cmd = "python bench/serve_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"W2: {s['tok_s']:.0f} tok/s via Serve HTTP, {d['tok_s']:.0f} tok/s engine direct, "
        f"{s['tok_s'] / d['tok_s']:.0%} kept, TTFT p50 {s['ttft_p50_ms']:.0f} ms, ITL p50 {s['itl_p50_ms']:.1f} ms "
        f"at {s['concurrency']} concurrent ({results['device']}, {cmd.strip()})"
    )


if __name__ == "__main__":
    main()
