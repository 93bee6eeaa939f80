"""The engine core in a process of its own, and the asyncio client that drives it.

Why a process: in a serving replica the event loop (Ray's streaming protocol
and the bookkeeping of every open request) and the engine's step loop would
share one GIL. With a small model a step is mostly Python, so every message
the loop handles delays the next step for everyone. Here the core steps in
its own interpreter and the serving process only moves messages.

    client = EngineCoreClient(EngineConfig(model="models/demo-target"))
    async for out in client.generate([1, 2, 3], SamplingParams(max_tokens=8), "req-1"):
        print(out.outputs[0].new_token_ids)

`EngineCoreClient` has `AsyncLLMEngine`'s interface. The two talk over one
socket pair (multiprocessing.connection framing, pickled tuples):

    client -> core   ("add", request_id, token_ids, params) | ("abort", request_id)
                     ("call", call_id, method_name, args) | ("stop",)
    core -> client   ("ready", CoreInfo) | ("step", deltas, failed, stats)
                     ("reply", call_id, value, error) | ("fatal", exception)

One "step" message per engine step carries every request's new tokens, not
one message per request: the core pickles only what changed (see
`LLMEngine.step_deltas`) and the client rebuilds full `RequestOutput`s from it.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.cpu_affinity import pin_process
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import EngineError, InvalidRequestError, RequestAbortedError
from engine.kv_cache.hash_log import CacheChanges
from engine.outputs import CompletionOutput, EngineStats, RequestDelta, RequestMetrics, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from engine.streams import ChunkInterval, ChunkPacer, PacedWake
from engine.tokenizer import load_tokenizer
from engine.validation import validate_request



@dataclass(frozen=True)
class CoreInfo:
    """What the client needs to validate requests without the model."""

    max_model_len: int
    vocab_size: int
    tokenizer_path: str | None  # where the core loaded its tokenizer from; None: the model has none
    stats: EngineStats


# ----- the core (child process) ----------------------------------------------------------


class EngineCore:
    """Applies the client's messages at step boundaries, steps, and answers with one message per step."""

    def __init__(self, engine: Any, conn: Connection) -> None:
        self._engine = engine
        self._conn = conn
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        # The socket is read on its own thread so a burst of requests never waits for a step to end.
        threading.Thread(target=self._receive, name="core-receive", daemon=True).start()

    def _receive(self) -> None:
        try:
            while True:
                self._inbox.put(self._conn.recv())
        except (EOFError, OSError):  # the client went away: nobody is left to serve
            self._inbox.put(("stop",))

    def run(self) -> None:
        while True:
            messages = self._drain(block=not self._engine.has_unfinished_requests())
            if any(m[0] == "stop" for m in messages):
                return
            failed: list[tuple[str, EngineError]] = []
            for message in messages:
                self._apply(message, failed)
            deltas = self._engine.step_deltas() if self._engine.has_unfinished_requests() else []
            # After aborts too: the client's stats must show the freed blocks.
            self._conn.send(("step", deltas, failed, self._engine.stats()))

    def _drain(self, block: bool) -> list[tuple]:
        messages = [self._inbox.get()] if block else []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def _apply(self, message: tuple, failed: list[tuple[str, EngineError]]) -> None:
        kind = message[0]
        if kind == "add":
            _, request_id, token_ids, params = message
            try:
                # Text is made on the client's side (see _Stream) unless stop strings need it here.
                self._engine.add_request(request_id, token_ids, params, detokenize=False)
            except EngineError as exc:
                failed.append((request_id, exc))
            except Exception as exc:  # one request's surprise must not stop the core for everyone
                failed.append((request_id, EngineError(f"request {request_id!r} could not be added: {exc!r}")))
        elif kind == "abort":
            self._engine.abort_request(message[1])
        elif kind == "call":
            _, call_id, name, args = message
            try:
                reply = ("reply", call_id, getattr(self._engine, name)(*args), None)
            except Exception as exc:  # a failed query fails its caller, not the core
                reply = ("reply", call_id, None, EngineError(f"{name} failed in the engine core: {exc!r}"))
            self._conn.send(reply)


def core_main(fd: int) -> int:
    """The child's entry point: read the config, build the engine, serve until the client leaves."""
    conn = Connection(fd)
    config: EngineConfig = conn.recv()
    try:
        if config.core_cpu is not None:
            # Before torch starts its threads: they inherit it (engine/cpu_affinity.py says why).
            pin_process({config.core_cpu})
        from engine.engine import LLMEngine  # torch and the model load here, not in the client

        engine = LLMEngine(config)
        # What is alive now (the model, torch's modules, the tokenizer: some 350k objects) lives as
        # long as the core: kept out of the collector's full passes, which would walk it all mid-step.
        gc.collect()
        gc.freeze()
        tokenizer_path = getattr(engine.tokenizer, "name_or_path", None) if engine.tokenizer is not None else None
        conn.send(("ready", CoreInfo(engine.max_model_len, engine.arch.vocab_size, tokenizer_path, engine.stats())))
        EngineCore(engine, conn).run()
    except Exception as exc:
        _send_fatal(conn, exc)
        raise
    return 0


def _send_fatal(conn: Connection, exc: Exception) -> None:
    try:
        conn.send(("fatal", exc))
    except Exception:  # unpicklable, or the client is gone
        try:
            conn.send(("fatal", EngineError(f"engine core failed: {exc!r}")))
        except OSError:
            pass


# ----- the client (serving process) --------------------------------------------------------


class _Stream:
    """One request on the client side: its outputs rebuilt from the core's deltas, held for its consumer.

    A delta only extends lists here; the `RequestOutput` (and the text of
    its new tokens) is made when the consumer is woken (see engine/streams.py),
    so a stream that is not due costs no objects, no decoding and no wake-up.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        n: int,
        pacer: ChunkPacer,
        detokenizers: list[IncrementalDetokenizer] | None = None,
    ) -> None:
        self.request_id = request_id
        # Set when the core sends no text for this request (no stop strings): it is made here.
        self._detokenizers = detokenizers
        self.prompt_token_ids = prompt_token_ids
        self.error: BaseException | None = None
        self._wake = PacedWake(pacer)
        self._token_ids: list[list[int]] = [[] for _ in range(n)]
        self._text = [""] * n
        self._logprobs: list[list[TokenLogprob] | None] = [None] * n
        self._new_ids: list[list[int]] = [[] for _ in range(n)]
        self._new_text = [""] * n
        self._new_logprobs: list[list[TokenLogprob] | None] = [None] * n
        self._finish: list[tuple[str | None, str | int | None]] = [(None, None)] * n
        self._finished = False
        self._num_cached = 0
        self._metrics: RequestMetrics | None = None

    def apply(self, delta: RequestDelta, now: float) -> None:
        _, self._finished, self._num_cached, self._metrics, choices = delta
        has_tokens = False
        for index, new_ids, new_text, finish_reason, stop_reason, new_logprobs in choices:
            self._token_ids[index].extend(new_ids)
            self._new_ids[index].extend(new_ids)
            if self._detokenizers is None:
                self._text[index] += new_text
                self._new_text[index] += new_text
            if new_logprobs is not None:  # extended in place: take() hands out copies
                _extend(self._logprobs, index, new_logprobs)
                _extend(self._new_logprobs, index, new_logprobs)
            self._finish[index] = (finish_reason, stop_reason)
            has_tokens = has_tokens or bool(new_ids)
        self._wake.offer(now, self._finished, has_tokens)

    def fail(self, exc: BaseException) -> None:
        if self._finished:
            return  # the request ended first: its consumer gets the end, not the later failure
        self.error = exc
        self._wake.set()

    async def get(self) -> RequestOutput:
        """Everything since the last get, as one output, once the consumer is due."""
        await self._wake.wait()
        if self.error is not None:
            raise self.error
        if self._detokenizers is not None:
            self._detokenize()
        outputs = [
            CompletionOutput(
                i, list(self._token_ids[i]), self._text[i], self._new_ids[i], self._new_text[i], *self._finish[i],
                None if self._logprobs[i] is None else list(self._logprobs[i]), self._new_logprobs[i],
            )
            for i in range(len(self._token_ids))
        ]
        n = len(outputs)
        self._new_ids, self._new_text = [[] for _ in range(n)], [""] * n
        self._new_logprobs = [[] if lp is not None else None for lp in self._logprobs]
        return RequestOutput(
            self.request_id, self.prompt_token_ids, outputs, self._finished, self._num_cached, self._metrics
        )

    def _detokenize(self) -> None:
        """Text for the tokens since the last get: one decode per chunk the consumer takes, not one
        per engine step (decoding made a delta cost 3.8 instead of 0.5 us here, and a replica at
        256 streams applies some 50k deltas a second)."""
        for index, new_ids in enumerate(self._new_ids):
            if new_ids:
                new_text = self._detokenizers[index].add(new_ids)[0]
                self._text[index] += new_text
                self._new_text[index] += new_text


def _extend(lists: list[list[TokenLogprob] | None], index: int, items: list[TokenLogprob]) -> None:
    if lists[index] is None:
        lists[index] = []
    lists[index].extend(items)


class EngineCoreClient:
    """`AsyncLLMEngine`'s interface over an engine core running in a child process.

    Every method runs on the caller's event loop; one reader thread receives
    the core's messages and hands each to the loop whole.
    """

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0, stop_grace_s: float = 5.0) -> None:
        """stop_grace_s: how long shutdown lets the core finish its step before killing it."""
        self._config = config
        self._stop_grace_s = stop_grace_s
        self._process, self._conn = _spawn_core()
        try:
            self._conn.send(config)
            info = self._wait_ready(startup_timeout_s)
        except BaseException:  # no core, no socket left behind
            _reap(self._process, timeout_s=30)
            self._conn.close()
            raise
        try:
            # Loaded now, not on first use inside the event loop: each stream without stop strings
            # turns its tokens into text here, which keeps that work off the core's step loop.
            self._tokenizer = None if info.tokenizer_path is None else load_tokenizer(info.tokenizer_path)
        except BaseException:
            self._conn.close()  # the core reads EOF and exits
            _reap(self._process, timeout_s=30)
            raise
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self._stats = info.stats
        # The core knows each request by an id of its own: deltas of an aborted request still on
        # their way must not reach a later request with the same id.
        self._streams: dict[str, _Stream] = {}  # by core id
        self._core_ids: dict[str, str] = {}  # request id -> core id, while its stream is open
        self._add_ids = itertools.count()
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errored: BaseException | None = None
        self._closed = False
        # Sent from a thread: a core that reads slowly (mid-step, or stuck) never blocks the event loop.
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="core-client-write", daemon=True)
        self._writer.start()
        self._reader = threading.Thread(target=self._read, name="core-client-read", daemon=True)
        self._reader.start()

    @property
    def tokenizer(self):
        return self._tokenizer

    def stats(self) -> EngineStats:
        """Numbers as of the core's last step boundary."""
        return self._stats

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        chunk_interval_s: ChunkInterval | None = None,
        detokenize: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; leaving early (cancel, break) aborts it.

        Steps the consumer has not taken yet are merged into one output. With
        chunk_interval_s, the consumer is also woken at most once per
        chunk_interval_s() (first tokens and the end at once). detokenize=False:
        no text unless the request has stop strings (the core makes that); the caller makes it.
        """
        self._check_alive()
        token_ids = self._tokenize(prompt)
        if request_id in self._core_ids:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        validate_request(token_ids, params, self.vocab_size, self.max_model_len)
        self._bind_loop()
        detokenizers = None
        if detokenize and self._tokenizer is not None and not params.stop:
            detokenizers = [IncrementalDetokenizer(self._tokenizer, []) for _ in range(params.n)]
        stream = _Stream(request_id, token_ids, params.n, ChunkPacer(chunk_interval_s), detokenizers)
        core_id = f"{request_id}#{next(self._add_ids)}"
        self._core_ids[request_id] = core_id
        self._streams[core_id] = stream
        finished = False
        try:
            self._send(("add", core_id, token_ids, params))
            while not finished:
                item = await stream.get()
                finished = item.finished
                yield item
        finally:
            del self._streams[core_id], self._core_ids[request_id]
            if not finished and self.errored is None and not self._closed:
                self._send(("abort", core_id))

    def abort(self, request_id: str) -> None:
        if (core_id := self._core_ids.get(request_id)) is not None:
            self._send(("abort", core_id))

    async def cached_block_hashes(self) -> list[int]:
        """Hashes of the blocks the core can serve from its prefix cache (for the router)."""
        return await self._call("cached_block_hashes")

    async def cached_block_changes(self, full: bool = False) -> CacheChanges:
        """Hashes cached and evicted since the last call: the core sends what changed, not its whole set."""
        return await self._call("cached_block_changes", full)

    def shutdown(self) -> None:
        """Stops the core. Called on an event loop it returns at once and the core is reaped on a thread."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(ForkingPickler.dumps(("stop",)))
        self._outbox.put(None)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._stop()
        else:
            threading.Thread(target=self._stop, name="core-client-stop", daemon=True).start()

    def _stop(self) -> None:
        _reap(self._process, timeout_s=self._stop_grace_s)
        # The core is gone, so the writer and the reader end (EPIPE, EOF): only then is the socket closed.
        self._writer.join(timeout=5)
        self._reader.join(timeout=5)
        self._conn.close()

    # ----- plumbing --------------------------------------------------------------------------

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids, not text")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return list(prompt)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise EngineError("EngineCoreClient is used from one event loop only")

    def _check_alive(self) -> None:
        if self.errored is not None:
            raise EngineError(f"the engine core has failed: {self.errored!r}")

    def _send(self, message: tuple) -> None:
        if self._closed:
            raise EngineError("the engine core has been shut down")
        # Pickled here, so a message that cannot be pickled fails its caller, not the writer thread.
        self._outbox.put(ForkingPickler.dumps(message))

    def _write(self) -> None:
        """Writer thread: send what the loop queued, in order."""
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(message)
            except (OSError, ValueError):  # the core is gone; the reader reports why
                return

    async def _call(self, name: str, *args: Any) -> Any:
        self._check_alive()
        self._bind_loop()
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, name, args))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _wait_ready(self, timeout_s: float) -> CoreInfo:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if self._process.poll() is not None:
                raise EngineError(f"the engine core exited with code {self._process.returncode} before it was ready")
            if time.monotonic() > deadline:
                self._process.kill()
                raise EngineError(f"the engine core was not ready within {timeout_s:.0f} s")
        kind, value = self._conn.recv()
        if kind == "fatal":
            raise value
        return value

    def _read(self) -> None:
        """Reader thread: receive whole messages and hand them to the loop."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "fatal":
                    return self._lost(message[1])
                # With no loop bound nothing was asked yet, so nothing can be waiting.
                if self._loop is not None and not self._hand_to_loop(message):
                    return
        except (EOFError, OSError) as exc:
            self._lost(EngineError(f"the engine core exited (code {self._process.poll()}): {exc!r}"))

    def _lost(self, exc: BaseException) -> None:
        """Reader thread: the core is gone. With no loop bound yet, `errored` refuses new requests;
        a request that binds the loop meanwhile is failed on the loop (hence the second check)."""
        if self._loop is None:
            self.errored = self.errored or exc
        if self._loop is None or not self._hand_to_loop(("fatal", exc)):
            self.errored = self.errored or exc

    def _hand_to_loop(self, message: tuple) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._dispatch, message)
            return True
        except RuntimeError:  # the loop has closed: nobody is left to tell
            return False

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, deltas, failed, stats = message
            self._stats = stats
            for request_id, exc in failed:
                if (stream := self._streams.get(request_id)) is not None:
                    stream.fail(exc)
            now = time.monotonic()
            for delta in deltas:
                if (stream := self._streams.get(delta[0])) is not None:
                    stream.apply(delta, now)
        elif kind == "reply":
            _, call_id, value, error = message
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)
        elif kind == "fatal":
            self._fail(message[1])

    def _fail(self, exc: BaseException) -> None:
        """The core is gone: every open stream and call gets an error, loudly."""
        self.errored = self.errored or exc
        for stream in self._streams.values():
            stream.fail(RequestAbortedError(f"engine core failed: {exc!r}"))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineError(f"engine core failed: {exc!r}"))


def _reap(process: subprocess.Popen, timeout_s: float) -> None:
    """Waits for the core to exit, killing it after timeout_s; never leaves a zombie behind."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _spawn_core() -> tuple[subprocess.Popen, Connection]:
    """Starts `python -m engine.core_process FD` with one end of a socket pair."""
    import socket

    ours, theirs = socket.socketpair()
    root = str(Path(__file__).resolve().parent.parent)  # so `-m engine.core_process` resolves to this tree
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.core_process", str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env
        )
    finally:
        theirs.close()
    return process, Connection(ours.detach())


if __name__ == "__main__":
    # Through the package, not this __main__ copy: what the core pickles must name engine.core_process.
    from engine.core_process import core_main as _core_main

    sys.exit(_core_main(int(sys.argv[1])))
