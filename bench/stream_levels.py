"""W2's load at one concurrency level: what each request saw, and the HTTP client that makes it.

One Python process cannot drive hundreds of SSE streams at the engine's pace (on
the H100 a single client process sat at 100% CPU while every Serve process idled
at a third of a core), so the Serve path splits a level over several client
processes (`client_share`, each an aiohttp event loop) and merges their results.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field


@dataclass
class LevelResult:
    concurrency: int
    requests: int = 0
    errors: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    # Server-Timing of streamed answers (ms): ingress call -> first output, -> replica arrival, arrival -> token.
    server_ms: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "output_tokens": self.output_tokens,
            "seconds": self.seconds,
            "tok_s": self.output_tokens / self.seconds if self.seconds else 0.0,
            "ttft_mean_ms": sum(self.ttft_s) / len(self.ttft_s) * 1e3 if self.ttft_s else float("nan"),
            "ttft_p50_ms": _pct(self.ttft_s, 50) * 1e3,
            "ttft_p99_ms": _pct(self.ttft_s, 99) * 1e3,
            "itl_p50_ms": _pct(self.itl_s, 50) * 1e3,
            "itl_p99_ms": _pct(self.itl_s, 99) * 1e3,
            **{f"server_{k}_mean_ms": sum(v) / len(v) for k, v in self.server_ms.items() if v},
        }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def run_level(prompts: list[list[int]], concurrency: int, one_request) -> LevelResult:
    """Runs every prompt with at most `concurrency` in flight; one_request(prompt, result) does one."""
    result = LevelResult(concurrency)
    sem = asyncio.Semaphore(concurrency)

    async def guarded(p: list[int]) -> None:
        async with sem:
            try:
                await one_request(p, result)
            except Exception as exc:  # counted, and the first few shown: errors are a figure here
                result.errors += 1
                if result.errors <= 3:
                    print(f"  request failed: {exc!r}", flush=True)
            result.requests += 1

    start = time.perf_counter()
    await asyncio.gather(*(guarded(p) for p in prompts))
    result.seconds = time.perf_counter() - start
    return result


def record_request(result: LevelResult, start: float, arrivals: list[float], tokens: int) -> None:
    """One request's figures: TTFT, and its mean inter-token latency (the same rule on both paths)."""
    result.output_tokens += tokens
    if arrivals:
        result.ttft_s.append(arrivals[0] - start)
        if tokens > 1:
            result.itl_s.append((arrivals[-1] - arrivals[0]) / (tokens - 1))


def client_share(base_url: str, model: str, prompts: list[list[int]], concurrency: int, output_len: int):
    """In a client process: its share of a level. Returns (result, start, end) on the shared monotonic clock."""
    import aiohttp

    async def main() -> LevelResult:
        connector = aiohttp.TCPConnector(limit=concurrency + 8)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
            return await run_level(prompts, concurrency, lambda p, r: stream_one(session, model, p, output_len, r))

    start = time.monotonic()
    result = asyncio.run(main())
    return result, start, time.monotonic()


async def stream_one(session, model: str, prompt: list[int], output_len: int, result: LevelResult) -> None:
    from deployments.server_timing import parse_end_timing, parse_server_timing

    body = {
        "model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    async with session.post("/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        for name, ms in parse_server_timing(resp.headers.get("server-timing", "")).items():
            result.server_ms.setdefault(name, []).append(ms)
        arrivals: list[float] = []
        completion_tokens = 0
        end: dict[str, float] = {}
        async for raw in resp.content:  # one line at a time
            line = raw.decode().strip()
            if line == "data: [DONE]":
                record_way_out(result, end, time.time())
                continue
            if not line.startswith("data: "):
                end = parse_end_timing(line) or end
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
            elif any(c.get("text") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    # Tokens come from the usage chunk: a text chunk can carry several tokens, or none yet.
    record_request(result, start, arrivals, completion_tokens)


# The way out of a stream's end (server_timing.format_end_timing), as server_ms entries: engine's finish
# -> its last output on the replica -> the ingress's last write -> the client's receipt of [DONE].
WAY_OUT = (("out_replica", "engine", "replica"), ("out_ingress", "replica", "ingress"), ("out_client", "ingress", "client"))


def record_way_out(result: LevelResult, end: dict[str, float], received_unix_s: float) -> None:
    marks = {**end, "client": received_unix_s}
    for name, since, until in WAY_OUT:
        if since in marks and until in marks:
            result.server_ms.setdefault(name, []).append((marks[until] - marks[since]) * 1e3)


def merge_shares(concurrency: int, parts: list[tuple[LevelResult, float, float]]) -> LevelResult:
    """One level's result from its client processes' shares; it lasted from the first start to the last end."""
    total = LevelResult(concurrency)
    for part, _, _ in parts:
        total.requests += part.requests
        total.errors += part.errors
        total.output_tokens += part.output_tokens
        total.ttft_s += part.ttft_s
        total.itl_s += part.itl_s
        for name, values in part.server_ms.items():
            total.server_ms.setdefault(name, []).extend(values)
    total.seconds = max(end for _, _, end in parts) - min(start for _, start, _ in parts)
    return total


def client_procs_for(concurrency: int) -> int:
    """One client process per 32 concurrent streams, at most 8 and at most half the cores."""
    return max(1, min(8, -(-concurrency // 32), (os.cpu_count() or 2) // 2))
