"""The draft model as its own Serve deployment, and the proposer LLM replicas call it through.

    draft = DraftServer.options(ray_actor_options={"num_gpus": 0.25}).bind(**draft_server_kwargs(config))
    llm = LLMServer.options(...).bind(config, draft)        # in the replica, with the handle it got:
    engine = LLMEngine(config.to_engine_config(), proposer=remote_proposer(config, draft_handle))

The deployment holds an `engine.spec.draft_service.DraftService` (a draft
model with its own paged cache and prefix cache; all the computing is
there, in engine/). Each LLM replica calls it once per engine step with the
whole batch of sequences that speculate, from the engine's step thread, so
the blocking `.result()` never sits on an event loop. A failed or slow call
costs only that step's proposals: the step goes on without speculation.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.spec.draft_service import DraftCall, DraftReply
from engine.spec.proposer import Proposals, SpecRequest

logger = logging.getLogger("ray.serve")


@serve.deployment(name="DraftServer", max_ongoing_requests=64)
class DraftServer:
    def __init__(self, **service_kwargs: Any) -> None:
        from engine.spec.draft_service import DraftService  # torch and the model load in replicas only

        self.service = DraftService(**service_kwargs)
        # Serve may run sync methods on a thread pool: one call at a time on the model.
        self._lock = threading.Lock()

    def propose(self, calls: list[DraftCall], release: list[str] | None = None) -> DraftReply:
        with self._lock:
            return self.service.propose(calls, release or [])

    def info(self) -> dict[str, Any]:
        return {
            "vocab_size": self.service.vocab_size,
            "num_speculative_tokens": self.service.k,
            "num_sequences": self.service.num_sequences,
            "num_free_blocks": self.service.allocator.num_free_blocks,
            "device": str(self.service.device),
        }


class RemoteDraftProposer:
    """An engine Proposer backed by the DraftServer deployment (see the module docstring)."""

    name = "remote"

    def __init__(
        self,
        handle: DeploymentHandle,
        num_speculative_tokens: int,
        vocab_size: int,
        device: torch.device | str = "cpu",
        timeout_s: float = 10.0,
    ) -> None:
        self._handle = handle
        self.k = num_speculative_tokens
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._prefix = uuid.uuid4().hex[:12]  # sequence ids are unique per engine only
        self._released: list[str] = []
        self.num_failures = 0
        self._last_warning = -float("inf")

    def _key(self, seq_id: int) -> str:
        return f"{self._prefix}:{seq_id}"

    def propose(self, batch: list[SpecRequest]) -> Proposals:
        calls = [DraftCall(self._key(r.seq.seq_id), list(r.seq.token_ids), r.num_tokens, r.temperature) for r in batch]
        release, self._released = self._released, []  # finished sequences ride along with the next call
        try:
            reply: DraftReply = self._handle.propose.remote(calls, release).result(timeout_s=self.timeout_s)
        except Exception as exc:  # the draft is an optimization: without it the step just does not speculate
            self.num_failures += 1
            if time.monotonic() - self._last_warning > 30:
                self._last_warning = time.monotonic()
                logger.warning("draft server call failed (%d so far), no proposals this step: %r", self.num_failures, exc)
            return Proposals.empty(len(batch), self.k, self.device)
        if any(t >= self.vocab_size for row in reply.token_ids for t in row):
            raise ValueError(
                f"the draft server proposes token ids outside the target's vocabulary ({self.vocab_size}); "
                "start it with vocab_size set to the target's"
            )
        return Proposals.from_lists(reply.token_ids, self.k, self.device, reply.dense_probs(self.vocab_size, self.k, self.device))

    def release(self, seq_ids: list[int]) -> None:
        self._released.extend(self._key(i) for i in seq_ids)


def draft_server_kwargs(config: Any) -> dict[str, Any]:
    """DraftServer's arguments from the app's config (deployments.config.AppConfig)."""
    spec = config.speculative
    return {
        "model": spec.draft_model,
        "num_speculative_tokens": spec.num_speculative_tokens,
        "dtype": config.dtype,
        "device": config.device,
        "block_size": config.cache.block_size,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "vocab_size": _vocab_size(config.model),
        "enforce_eager": config.enforce_eager,
        "seed": config.seed,
    }


def remote_proposer(config: Any, handle: DeploymentHandle) -> RemoteDraftProposer:
    """What an LLM replica gives its engine when speculative.method is 'remote' (config: AppConfig)."""
    from engine.model.loader import resolve_device

    return RemoteDraftProposer(
        handle, config.speculative.num_speculative_tokens, _vocab_size(config.model), resolve_device(config.device)
    )


def _vocab_size(model: str) -> int:
    """The target's vocabulary size, from its config.json (a preset's, a folder's or a hub id's)."""
    if model.startswith("preset:"):
        from engine.model.presets import preset_config

        return int(preset_config(model.removeprefix("preset:"))["vocab_size"])
    from engine.model.loader import resolve_model_path

    return int(json.loads((resolve_model_path(model) / "config.json").read_text())["vocab_size"])
