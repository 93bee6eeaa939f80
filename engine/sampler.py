"""Turns the last-position logits of a batch into next tokens, all rows at once on the device.

Greedy rows take the argmax. Other rows are scaled by temperature, cut by
top-k / top-p, and sampled by the exponential-race trick (argmax of p / E with
E ~ Exp(1)), which needs only one random draw per vocabulary entry; a request
with a seed draws its noise from its own generator, so its tokens do not
depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.sequence import Sequence


@dataclass
class SamplingBatch:
    temperatures: torch.Tensor | None  # [N] fp32; None when every row is greedy
    top_ks: torch.Tensor | None  # [N] int64, vocab size where off
    top_ps: torch.Tensor | None  # [N] fp32
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    num_logprobs: list[int | None]

    @classmethod
    def from_seqs(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> "SamplingBatch":
        params = [s.params for s in seqs]
        num_logprobs = [p.logprobs for p in params]
        if all(p.temperature == 0.0 for p in params):
            # An all-greedy batch (the common offline case) reads nothing else: no lists, no copies.
            return cls(None, None, None, [], True, False, False, num_logprobs)

        def to_dev(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            temperatures=to_dev([p.temperature for p in params], torch.float32),
            top_ks=to_dev([p.top_k or vocab_size for p in params], torch.int64),
            top_ps=to_dev([p.top_p for p in params], torch.float32),
            generators=[s.generator for s in seqs],
            all_greedy=False,
            any_top_k=any(0 < p.top_k < vocab_size for p in params),
            any_top_p=any(p.top_p < 1.0 for p in params),
            num_logprobs=num_logprobs,
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


Draw = tuple[torch.Tensor, "tuple | None"]  # one pass's tokens [N] and logprob tensors (Sampler.draw)


class PendingSample:
    """The tokens of one or more passes over the same rows, still on the device, and their copy to
    the host under way (one copy for all the passes).

    `token_ids`, the last pass's, can feed the next step at once (async scheduling); `results()`
    waits only for these copies, not for whatever was queued on the device after them.
    """

    def __init__(self, draws: list[Draw], num_logprobs: list[int | None]) -> None:
        self.token_ids = draws[-1][0]
        self._num_logprobs = num_logprobs
        tokens = _stacked([d[0] for d in draws])  # [passes, N]
        logprobs = () if draws[0][1] is None else tuple(_stacked(list(parts)) for parts in zip(*(d[1] for d in draws)))
        # A non-blocking copy from CUDA lands in pinned memory; the event says when it is there.
        self._host = [t.to("cpu", non_blocking=True) for t in (tokens, *logprobs)]
        self._event = None
        if tokens.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def results(self) -> list[SamplerOutput]:
        """One output per pass, in order."""
        if self._event is not None:
            self._event.synchronize()
        tokens, *logprobs = self._host
        return [
            _host_output(tokens[i], tuple(t[i] for t in logprobs) or None, self._num_logprobs)
            for i in range(tokens.shape[0])
        ]


class Sampler:
    def __init__(self, device: torch.device, seed: int, vocab_size: int | None = None) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # On CUDA, greedy tokens of a few rows in one kernel (engine/greedy_argmax.py).
        self._argmax = None
        if device.type == "cuda" and vocab_size:
            from engine.greedy_argmax import GreedyArgmax

            self._argmax = GreedyArgmax(vocab_size, device)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        tokens = self.sample(logits, batch)
        return _host_output(tokens, self._logprob_tensors(logits, tokens, batch), batch.num_logprobs)

    @torch.no_grad()
    def launch(self, logits: torch.Tensor, batch: SamplingBatch) -> PendingSample:
        """Like calling the sampler, without waiting for the device: the tokens are read back later."""
        return PendingSample([self.draw(logits, batch)], batch.num_logprobs)

    @torch.no_grad()
    def draw(self, logits: torch.Tensor, batch: SamplingBatch) -> Draw:
        """The tokens and, where rows want them, the logprob tensors, all left on the device."""
        tokens = self.sample(logits, batch)
        return tokens, self._logprob_tensors(logits, tokens, batch)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy = self.greedy_tokens(logits)
        if batch.all_greedy:
            return greedy
        scaled = logits / batch.temperatures.clamp_min(1e-5).unsqueeze(1)
        if batch.any_top_k or batch.any_top_p:
            scaled = truncate_top_k_top_p(scaled, batch.top_ks, batch.top_ps if batch.any_top_p else None)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, gen in enumerate(batch.generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.temperatures == 0.0, greedy, sampled)

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """logits.argmax(dim=-1) [N], the first index on ties."""
        if self._argmax is not None and self._argmax.fits(logits):
            return self._argmax(logits)
        return logits.argmax(dim=-1)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> list[TokenLogprob | None]:
        return _host_output(tokens, self._logprob_tensors(logits, tokens, batch), batch.num_logprobs).logprobs

    @staticmethod
    def _logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> tuple | None:
        """(chosen [N], top values [N, k], top ids [N, k]) on the device; None when no row wants logprobs."""
        wanted = [k for k in batch.num_logprobs if k is not None]
        if not wanted:
            return None
        # Log-probabilities of the model's own distribution, before temperature and truncation.
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        k = max(wanted)
        top_vals, top_ids = (logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0]))
        return chosen, top_vals, top_ids


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, without a copy kernel for the common single pass."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _host_output(tokens: torch.Tensor, logprob_tensors: tuple | None, num_logprobs: list[int | None]) -> SamplerOutput:
    """The sampled tokens and the logprobs each row asked for, as Python objects."""
    token_list = tokens.tolist()
    if logprob_tensors is None:
        return SamplerOutput(token_list, [None] * len(num_logprobs))
    chosen, top_vals, top_ids = (t.tolist() for t in logprob_tensors)
    out: list[TokenLogprob | None] = []
    for row, n in enumerate(num_logprobs):
        if n is None:
            out.append(None)
            continue
        top = {int(t): float(v) for t, v in zip(top_ids[row][:n], top_vals[row][:n])}
        out.append(TokenLogprob(token_list[row], float(chosen[row]), top))
    return SamplerOutput(token_list, out)


def truncate_top_k_top_p(scaled: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor | None) -> torch.Tensor:
    """Logits [N, V] with everything outside each row's top-k and top-p at -inf (no host syncs).

    top_ks [N]: the vocabulary size where off; top_ps [N], None when no row has one. A row
    at top_p 1 keeps everything even where rounding sums its probabilities past 1, so a
    request's tokens do not depend on what else shares its batch."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(scaled.shape[-1], device=scaled.device).unsqueeze(0)
    drop = ranks >= top_ks.unsqueeze(1)
    if top_ps is not None:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= (mass_before >= top_ps.unsqueeze(1)) & (top_ps < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
