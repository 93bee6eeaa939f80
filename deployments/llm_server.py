"""The LLM deployment: one `AsyncLLMEngine` per replica, shared by every request it gets.

Requests from many HTTP clients land here concurrently (up to
max_ongoing_requests) and all join the engine's running batch: that is the
continuous batching across HTTP requests. A request whose caller goes away
(client disconnect -> Serve cancels the call) leaves the engine's stream
early, which aborts it and frees its blocks at the next step boundary.

A background task publishes the replica's cached block hashes, load and
engine stats to the prefix index (see prefix_index.py) for the router and
for /metrics. It only awaits Ray calls, never blocks the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig, RouterOptions
from deployments.gc_pauses import GcPauses
from deployments.loop_lag import LoopLag
from deployments.messages import ChoiceDelta, GenerateOutput, GenerateRequest, ModelInfo, RequestTiming
from deployments.ray_env import set_switch_interval
from engine.cpu_affinity import pin_process, visible_gpu_index
from engine.kv_cache.hash_log import CacheChanges
from engine.outputs import RequestOutput

if TYPE_CHECKING:
    from engine.async_engine import AsyncLLMEngine
    from engine.core_process import EngineCoreClient

logger = logging.getLogger("ray.serve")

PREFIX_INDEX_ACTOR = "prefix_index"


def _stamp_finish(timing: RequestTiming, out: RequestOutput) -> None:
    """The request's end on the wall clock: when the engine finished it (its metrics hold the
    system-wide monotonic clock, the same in the engine core's process) and now, here."""
    now_unix, now = time.time(), time.monotonic()
    timing.replica_finished_unix_s = now_unix
    if out.metrics is not None and out.metrics.finished_time is not None:
        timing.engine_finished_unix_s = now_unix - (now - out.metrics.finished_time)


@serve.deployment(name="LLMServer")
class LLMServer:
    def __init__(self, config: AppConfig, draft: DeploymentHandle | None = None) -> None:
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self._config = config
        set_switch_interval(config.gil_switch_interval_s)
        # Looked up first: nothing that can raise comes after the engine (a child process) has started.
        self._index: ActorHandle = serve.get_deployment_actor(PREFIX_INDEX_ACTOR)
        plan = config.cpu_plan()
        if plan is not None:
            pin_process(plan.others)
        self.engine = _start_engine(config, draft, None if plan is None else plan.core_cpu(visible_gpu_index()))
        self._ongoing = 0
        # Arrival here -> first token, summed over requests: set against the clients' TTFT it
        # tells waiting inside the replica from waiting before it (proxy, ingress, routing).
        self._first_token_wait_s = 0.0
        self._first_tokens = 0
        self._index_address: tuple[str, str] | None = None
        self._publisher: CachePublisher | None = None
        # The wait a request sees here before any code of ours runs (published, /metrics).
        self._loop_lag = LoopLag()
        self._gc_pauses = GcPauses()
        self._gc_pauses.start()

    # ----- Serve hooks -------------------------------------------------------------------

    async def record_replica_metadata(self) -> dict[str, Any]:
        """Called once when the replica is ready; routers read it as `replica.replica_metadata`."""
        self._index_address = tuple(await self._index.address.remote())
        self._start_publisher()
        return {"prefix_index": list(self._index_address)}

    def check_health(self) -> None:
        if self.engine.errored is not None:
            raise RuntimeError(f"engine step loop failed: {self.engine.errored!r}")

    def __del__(self) -> None:
        # Serve calls this even when __init__ raised or has not finished: any attribute may be missing.
        if getattr(self, "_publisher", None) is not None:
            self._publisher.stop()
        if getattr(self, "_loop_lag", None) is not None:
            self._loop_lag.stop()
        if getattr(self, "_gc_pauses", None) is not None:
            self._gc_pauses.stop()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    # ----- calls from the ingress ----------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.vocab_size,
            block_size=self._config.cache.block_size,
            prefix_index=self._index_address,
        )

    def stats(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "ongoing_requests": self._ongoing, **self._published_stats()}

    def _published_stats(self) -> dict[str, Any]:
        lag = self._loop_lag.totals()
        return {
            **dataclasses.asdict(self.engine.stats()),
            "first_token_wait_s_total": self._first_token_wait_s,
            "first_tokens_total": self._first_tokens,
            "loop_lag_s_total": lag.lag_s,
            "loop_lag_checks_total": lag.checks,
            **self._gc_pauses.stats(),
        }

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """The whole completion in one answer."""
        result: GenerateOutput | None = None
        async for out in self._run(request, stream_interval_s=None):
            result = out
        assert result is not None  # _run always ends with a finished output
        return result

    async def generate_many(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Several prompts of one HTTP request, batched together here.

        One call, not one per prompt: Serve's router matches routing decisions
        to calls by their parent request's id, which these would all share.
        """
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.generate(r)) for r in requests]
        except BaseExceptionGroup as eg:  # the caller gets the first failure itself, not a group
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Deltas as the engine makes them, coalesced by `_stream_interval_s`."""
        async for out in self._run(request, stream_interval_s=self._stream_interval_s):
            yield out

    def _stream_interval_s(self) -> float:
        return chunk_interval_s(self._ongoing, self._config.stream_interval_s, self._config.max_stream_chunks_per_s)

    async def _run(
        self, request: GenerateRequest, stream_interval_s: Callable[[], float] | None
    ) -> AsyncIterator[GenerateOutput]:
        """One chunk per output the engine wakes us with (paced by stream_interval_s), or one in all if None."""
        self._start_publisher()
        self._ongoing += 1
        start = time.monotonic()
        last_token: float | None = None
        timing = RequestTiming(arrived_unix_s=time.time(), router_unix_s=request.router_unix_s)
        first_sent = False
        pending: GenerateOutput | None = None
        pace = stream_interval_s or (lambda: math.inf)
        try:
            # aclosing: when our caller stops early, the engine's stream is closed right
            # away (which aborts the request), not whenever it is garbage-collected.
            stream = self.engine.generate(
                request.prompt_token_ids, request.params, request.request_id, pace, detokenize=request.detokenize
            )
            async with aclosing(stream):
                async for out in stream:
                    now = time.monotonic()
                    delta = self._delta(out)
                    new_tokens = max((len(c.token_ids) for c in delta.choices), default=0)
                    if new_tokens:
                        if last_token is None:
                            timing.time_to_first_token_s = now - start
                            self._first_token_wait_s += now - start
                            self._first_tokens += 1
                        else:
                            timing.inter_token_latencies_s.extend([(now - last_token) / new_tokens] * new_tokens)
                        last_token = now
                    if pending is None:
                        pending = delta
                    else:
                        pending.merge(delta)
                    if out.finished:
                        _stamp_finish(timing, out)
                    if out.finished or stream_interval_s is not None:
                        if out.finished or not first_sent:
                            pending.timing = timing
                        first_sent = True
                        yield pending
                        pending = None
        finally:
            self._ongoing -= 1

    def _delta(self, out: RequestOutput) -> GenerateOutput:
        choices = [
            ChoiceDelta(c.index, c.new_text, list(c.new_token_ids), c.new_logprobs, c.finish_reason)
            for c in out.outputs
            if c.new_token_ids or c.new_text or c.finish_reason
        ]
        return GenerateOutput(
            request_id=out.request_id,
            replica_id=self.replica_id,
            prompt_tokens=len(out.prompt_token_ids),
            cached_tokens=out.num_cached_tokens,
            choices=choices,
            finished=out.finished,
        )

    def _start_publisher(self) -> None:
        self._loop_lag.ensure_started()
        if self._publisher is None:
            self._publisher = CachePublisher(
                replica_id=self.replica_id,
                index=self._index,
                resolve_index=lambda: serve.get_deployment_actor(PREFIX_INDEX_ACTOR),
                cache_changes=self.engine.cached_block_changes,
                stats=self._published_stats,
                load=lambda: self._ongoing,
                options=self._config.router,
            )
            self._publisher.start()


def chunk_interval_s(open_streams: int, min_interval_s: float, max_chunks_per_s: float) -> float:
    """How long each stream holds its tokens before sending them on as one chunk."""
    # Every chunk costs a message on each hop (replica -> ingress -> proxy), whatever it
    # carries: the replica's chunk rate stays bounded by growing each stream's interval.
    return max(min_interval_s, open_streams / max_chunks_per_s)


def _start_engine(
    config: AppConfig, draft: DeploymentHandle | None, core_cpu: int | None
) -> EngineCoreClient | AsyncLLMEngine:
    """The replica's engine: in a child process (on core_cpu, if any), or (remote draft) stepping
    in a thread here."""
    # torch and the model code are imported by replicas only, never by the app builder.
    if config.engine_in_process:
        from engine.core_process import EngineCoreClient

        return EngineCoreClient(config.to_engine_config(core_cpu))
    from engine.async_engine import AsyncLLMEngine
    from engine.engine import LLMEngine

    proposer = None
    if draft is not None:  # speculative.method 'remote': proposals from the draft deployment
        from deployments.draft_server import remote_proposer

        proposer = remote_proposer(config, draft)
    return AsyncLLMEngine(engine=LLMEngine(config.to_engine_config(), proposer=proposer))


class CachePublisher:
    """Keeps the prefix index's view of one replica fresh, sending only what changed.

    Busy or changed: every publish_interval_s. Idle: a heartbeat every
    heartbeat_s, so the index knows the replica is alive. The engine itself
    keeps the log of what its cache gained and lost (engine/kv_cache/hash_log.py),
    so a round here costs what changed, not a pass over every cached hash.
    """

    def __init__(
        self,
        replica_id: str,
        index: ActorHandle,
        resolve_index: Callable[[], ActorHandle],
        cache_changes: Callable[[bool], Awaitable[CacheChanges]],
        stats: Callable[[], dict[str, Any]],
        load: Callable[[], int],
        options: RouterOptions,
    ) -> None:
        self._replica_id = replica_id
        self._index = index
        self._resolve_index = resolve_index
        self._cache_changes = cache_changes
        self._stats = stats
        self._load = load
        self._options = options
        self._index_token: str | None = None  # None: send everything next time
        self._last_stats: dict[str, Any] = {}
        self._last_publish = -math.inf
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._options.publish_interval_s)
            try:
                stats = self._stats()
                busy = self._load() > 0 or stats["num_running"] > 0 or stats["num_waiting"] > 0
                heartbeat_due = time.monotonic() - self._last_publish >= self._options.heartbeat_s
                # Changed stats catch work that started and ended between two rounds.
                if busy or heartbeat_due or stats != self._last_stats:
                    await self.publish(stats)
            except Exception as exc:  # the index may be restarting: find it again, resend everything
                logger.warning("publishing to the prefix index failed: %r", exc)
                self._index_token = None
                try:
                    self._index = await asyncio.to_thread(self._resolve_index)
                except Exception:  # not back yet; the next round tries again
                    pass

    async def publish(self, stats: dict[str, Any]) -> None:
        reset = self._index_token is None
        # Without prefix routing nobody reads the hashes: publish stats only.
        changes = await self._cache_changes(reset) if self._options.prefix_aware else CacheChanges(full=reset)
        reset = changes.full  # also when the engine's log overflowed: a whole set, which replaces the old
        token = await self._index.update.remote(
            self._replica_id, changes.added, changes.removed, reset=reset, load=self._load(), stats=stats
        )
        # A new token after a diff: the index restarted and never saw our earlier sets.
        self._index_token = token if reset or token == self._index_token else None
        self._last_stats = stats
        self._last_publish = time.monotonic()
