"""AsyncLLMEngine: an asyncio stream of outputs per request over one LLMEngine.

The step loop runs in one worker thread so the event loop never blocks on a
forward pass; requests and aborts reach that thread through a lock-guarded
inbox and take effect at the next step boundary.

    engine = AsyncLLMEngine(EngineConfig(model="models/demo-target"))
    async for out in engine.generate("def fib(n):", SamplingParams(max_tokens=32), "req-1"):
        print(out.outputs[0].new_text, end="")
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from engine.config import EngineConfig
from engine.engine import LLMEngine, Prompt
from engine.errors import EngineError, InvalidRequestError, RequestAbortedError
from engine.kv_cache.hash_log import CacheChanges
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.streams import ChunkInterval, ChunkPacer, OutputStream


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None) -> None:
        if engine is None:
            if config is None:
                raise EngineError("AsyncLLMEngine needs an EngineConfig or an LLMEngine")
            engine = LLMEngine(config)
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._lock = threading.Lock()
        self._pending_adds: list[tuple[str, list[int], SamplingParams, bool]] = []
        self._pending_aborts: list[str] = []
        self._streams: dict[str, OutputStream] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stats: EngineStats = engine.stats()
        self.errored: BaseException | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.arch.vocab_size

    async def cached_block_hashes(self) -> list[int]:
        """Hashes of the blocks the engine can serve from its prefix cache (for the router)."""
        # The worker thread may be mid-step; the hash list is copied in one C call.
        return self.engine.cached_block_hashes()

    async def cached_block_changes(self, full: bool = False) -> CacheChanges:
        """Hashes cached and evicted since the last call (the log takes its own lock against the worker)."""
        return self.engine.cached_block_changes(full)

    def stats(self) -> EngineStats:
        """Numbers as of the last step boundary (read without touching the worker thread)."""
        return self._stats

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
        chunk_interval_s: ChunkInterval | None = None,
        detokenize: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; leaving early (cancel, break) aborts it.

        Outputs the consumer has not taken yet are merged into one. With
        chunk_interval_s, the consumer is also woken at most once per
        chunk_interval_s() (first tokens and the end at once). detokenize=False:
        no text unless the request has stop strings; the caller makes it.
        """
        token_ids = self.engine.tokenize(prompt)
        with self._lock:
            taken = request_id in self._streams
        if taken:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        # Validation is pure, so it is safe here while the worker thread steps.
        self.engine.validate(request_id, token_ids, params)
        self._ensure_loop()
        stream = OutputStream(ChunkPacer(chunk_interval_s))
        with self._lock:
            self._streams[request_id] = stream
            self._pending_adds.append((request_id, token_ids, params, detokenize))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending_aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def _ensure_loop(self) -> None:
        if self.errored is not None:
            raise EngineError(f"the engine's step loop has failed: {self.errored!r}")
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                idle = not (self._pending_adds or self._pending_aborts or self.engine.has_unfinished_requests())
            if idle:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs, failed = await loop.run_in_executor(self._executor, self._step)
            except Exception as exc:  # a bug in the step loop: fail every open stream, loudly
                self.errored = exc
                with self._lock:
                    streams = list(self._streams.values())
                for stream in streams:
                    stream.fail(RequestAbortedError(f"engine step failed: {exc!r}"))
                raise
            now = time.monotonic()
            with self._lock:
                for request_id, error in failed:
                    if (stream := self._streams.get(request_id)) is not None:
                        stream.fail(error)
                for out in outputs:
                    if (stream := self._streams.get(out.request_id)) is not None:
                        stream.put(out, now)

    def _step(self) -> tuple[list[RequestOutput], list[tuple[str, EngineError]]]:
        """Runs in the worker thread: apply the inbox, then one engine step."""
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
        failed: list[tuple[str, EngineError]] = []
        for request_id, token_ids, params, detokenize in adds:
            try:
                self.engine.add_request(request_id, token_ids, params, detokenize=detokenize)
            except EngineError as exc:  # e.g. the same id sent twice at once
                failed.append((request_id, exc))
            except Exception as exc:  # one request's surprise must not stop the loop for everyone
                failed.append((request_id, EngineError(f"request {request_id!r} could not be added: {exc!r}")))
        for request_id in aborts:
            self.engine.abort_request(request_id)
        outputs = self.engine.step()
        self._stats = self.engine.stats()
        return outputs, failed

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
