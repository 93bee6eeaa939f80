"""Checks the Triton paged-attention kernels on a GPU and times them.

Qwen3-0.6B attention shapes (16 query heads, 8 KV heads, head_dim 128), bf16,
block size 16, shuffled block tables:

- decode, batch 256, contexts uniform in [100, 1300]
- decode, batch 1, context 4096 (split-K), with a sweep over num_splits
- decode captured in a CUDA graph and replayed
- prefill, 8 sequences of 512 new tokens after 256 cached ones
- a speculative verify pass, 5 new tokens per sequence after ~380 cached, at
  batch 1 and 16: the decode kernel (a causal query per token) beside the
  prefill kernel

Each result is compared with engine.attention.torch_ref (relative error of
the whole output, in norm, under 2e-2) and timed with triton.testing.do_bench
(median). Decode reports GB/s of K+V read; prefill TFLOP/s.

    python bench/attention_kernels.py            # exits 1 on a mismatch or error
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
TOLERANCE = 2e-2


class Case:
    """One batch on the GPU: caches, shuffled block tables, queries and metadata."""

    def __init__(self, seq_lens: list[int], query_lens: list[int], gen: torch.Generator, device: torch.device):
        from engine.attention.metadata import AttentionMetadata

        blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + 8
        ids = torch.randperm(num_blocks, generator=gen)
        block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
        used = 0
        for b, n in enumerate(blocks_per_seq):
            block_tables[b, :n] = ids[used : used + n].int()
            used += n
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=DTYPE)
        self.v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=DTYPE)
        self.q = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=DTYPE)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        self.meta = AttentionMetadata(
            slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=block_tables.to(device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )
        self.scale = HEAD_DIM**-0.5
        # Bytes of K and V that attention must read at least once.
        self.kv_bytes = 2 * sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * self.k_cache.element_size()
        # Causal attention FLOPs: two matmuls of 2*D per (query head, visible key).
        visible = sum(q_len * (s - q_len) + q_len * (q_len + 1) // 2 for q_len, s in zip(query_lens, seq_lens))
        self.flops = 4 * HEAD_DIM * NUM_HEADS * visible

    def reference(self) -> torch.Tensor:
        from engine.attention.torch_ref import paged_attention_ref

        return paged_attention_ref(self.q.float(), self.k_cache, self.v_cache, self.meta, self.scale)

    def decode(self, num_splits: int | None = None, query_len: int = 1) -> torch.Tensor:
        from engine.attention.triton_paged import paged_decode_attention

        m = self.meta
        return paged_decode_attention(
            self.q, self.k_cache, self.v_cache, m.block_tables, m.seq_lens, self.scale, num_splits=num_splits,
            query_len=query_len,
        )

    def prefill(self) -> torch.Tensor:
        from engine.attention.triton_paged import paged_prefill_attention

        m = self.meta
        return paged_prefill_attention(
            self.q,
            self.k_cache,
            self.v_cache,
            m.block_tables,
            m.query_start_loc,
            m.seq_lens,
            m.max_query_len,
            self.scale,
        )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, str]] = []
        self.failures: list[str] = []

    def check(self, name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
        err = rel_err(out, ref)
        if not err < TOLERANCE:
            self.failures.append(f"{name}: relative error {err:.3e} >= {TOLERANCE}")
        return err

    def add(self, name: str, err: float, ms: float, rate: str) -> None:
        self.rows.append((name, err, ms, rate))
        print(f"  {name:<44} err {err:.2e}  {ms * 1e3:9.1f} us  {rate}", flush=True)

    def table(self) -> str:
        lines = [f"{'case':<44} {'rel err':>9} {'median us':>10}  rate", "-" * 82]
        lines += [f"{n:<44} {e:>9.2e} {ms * 1e3:>10.1f}  {r}" for n, e, ms, r in self.rows]
        return "\n".join(lines)


def gbps(case: Case, ms: float) -> str:
    return f"{case.kv_bytes / (ms * 1e-3) / 1e9:7.0f} GB/s KV"


def run_decode_batch(
    report: Report, gen: torch.Generator, dev: torch.device, batch: int, lens: list[int]
) -> tuple[Case, torch.Tensor]:
    from engine.attention.triton_paged import _num_sms, decode_num_splits

    case = Case(lens, [1] * batch, gen, dev)
    ref = case.reference()
    splits = decode_num_splits(batch, NUM_KV_HEADS, case.meta.block_tables.shape[1] * BLOCK_SIZE, _num_sms(dev))
    ctx = f"{min(lens)}..{max(lens)}" if min(lens) != max(lens) else f"{lens[0]}"
    name = f"decode B={batch} ctx {ctx} (auto: {splits} splits)"
    err = report.check(name, case.decode(), ref)
    ms = bench_ms(case.decode)
    report.add(name, err, ms, gbps(case, ms))
    return case, ref


def run_graph_decode(report: Report, case: Case, ref: torch.Tensor) -> None:
    """Capture one decode call in a CUDA graph (fails if it syncs with the host), replay it."""
    case.decode()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.decode()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = case.decode()
    graph.replay()
    torch.cuda.synchronize()
    name = f"decode B={len(case.meta.seq_lens_cpu)} in a CUDA graph"
    err = report.check(name, out, ref)
    ms = bench_ms(graph.replay)
    report.add(name, err, ms, gbps(case, ms))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sweep", action="store_true", help="skip the num_splits sweep at batch 1")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("attention_kernels: no CUDA device; this check needs a GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}", end="")
    import triton

    print(f", triton {triton.__version__}")
    print(f"heads {NUM_HEADS}/{NUM_KV_HEADS} kv, head_dim {HEAD_DIM}, {DTYPE}, block_size {BLOCK_SIZE}", flush=True)
    report = Report()

    def guarded(name, fn, *fn_args):
        try:
            return fn(*fn_args)
        except Exception:  # noqa: BLE001 - report every case, then fail
            traceback.print_exc()
            report.failures.append(f"{name}: raised (see traceback above)")
            return None

    lens = torch.randint(100, 1301, (256,), generator=gen).tolist()
    big = guarded("decode B=256", run_decode_batch, report, gen, dev, 256, lens)
    if big is not None:
        guarded("decode B=256 graph", run_graph_decode, report, *big)
    del big

    one = guarded("decode B=1", run_decode_batch, report, gen, dev, 1, [4096])
    if one is not None and not args.no_sweep:
        case, ref = one

        def sweep():
            for splits in (1, 4, 8, 16, 32, 64):
                name = f"decode B=1 ctx 4096, num_splits={splits}"

                def fn(s=splits):
                    return case.decode(num_splits=s)

                err = report.check(name, fn(), ref)
                ms = bench_ms(fn)
                report.add(name, err, ms, gbps(case, ms))

        guarded("decode B=1 sweep", sweep)
    if one is not None:
        guarded("decode B=1 graph", run_graph_decode, report, *one)
    del one

    def prefill():
        case = Case([768] * 8, [512] * 8, gen, dev)
        name = "prefill 8 x 512 new after 256 cached"
        err = report.check(name, case.prefill(), case.reference())
        ms = bench_ms(case.prefill)
        report.add(name, err, ms, f"{case.flops / (ms * 1e-3) / 1e12:7.1f} TFLOP/s")

    guarded("prefill", prefill)

    def verify(batch: int):
        q_len = 5
        case = Case(torch.randint(380, 400, (batch,), generator=gen).tolist(), [q_len] * batch, gen, dev)
        ref = case.reference()
        for name, fn in (
            (f"verify B={batch}, {q_len} new: decode kernel", lambda: case.decode(query_len=q_len)),
            (f"verify B={batch}, {q_len} new: prefill kernel", case.prefill),
        ):
            err = report.check(name, fn(), ref)
            ms = bench_ms(fn)
            report.add(name, err, ms, gbps(case, ms))

    for batch in (1, 16):
        guarded(f"verify B={batch}", verify, batch)

    print()
    print(report.table())
    if report.failures:
        print("\nFAILED:\n  " + "\n  ".join(report.failures), file=sys.stderr)
        return 1
    print("\nall kernels match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
