"""What the step-loop tests share: prompts, a serving-loop driver that checks the stream, and
what two runs of the same work must agree on (tokens, reasons, text, logprobs, the KV pool)."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams

BS = 4
MAX_NEW = 24


def _rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


COMMON = _rand_tokens(40, 100)
PROMPTS = [_rand_tokens(n, n) for n in (1, 5, 17, 33, 64)] + [COMMON + _rand_tokens(3, 1), COMMON + _rand_tokens(9, 2)]
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


def run(engine, prompts, params) -> list:
    """add_request + step until done, as a serving loop drives it; final outputs in prompt order.

    Also checks the stream: deltas add up to the final output, and nothing comes after it.
    """
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"req-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    streams: dict[str, list] = {rid: [] for rid in ids}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert not streams[out.request_id] or not streams[out.request_id][-1].finished
            streams[out.request_id].append(out)
    finals = [streams[rid][-1] for rid in ids]
    for rid, final in zip(ids, finals):
        assert final.finished
        for c in final.outputs:
            assert sum((o.outputs[c.index].new_token_ids for o in streams[rid]), []) == c.token_ids
            assert "".join(o.outputs[c.index].new_text for o in streams[rid]) == c.text
    return finals


def summary(outputs) -> list:
    """What must match exactly: logprob values only to float noise (see `close_logprobs`)."""
    return [
        [(c.token_ids, c.finish_reason, c.stop_reason, c.text, _logprob_ids(c.logprobs)) for c in o.outputs]
        for o in outputs
    ]


def _logprob_ids(logprobs) -> list | None:
    return None if logprobs is None else [(lp.token_id, list(lp.top)) for lp in logprobs]


def close_logprobs(got, want) -> bool:
    """A row's logits may come from a batch of another size: equal to float noise, not bit for bit."""
    values = [
        [lp.logprob, *lp.top.values()] for o in got for c in o.outputs for lp in (c.logprobs or [])
    ]
    wanted = [
        [lp.logprob, *lp.top.values()] for o in want for c in o.outputs for lp in (c.logprobs or [])
    ]
    return len(values) == len(wanted) and all(v == pytest.approx(w, abs=1e-4) for v, w in zip(values, wanted))


def pool_state(engine) -> tuple:
    return engine.allocator.num_free_blocks, sorted(engine.cached_block_hashes())


def assert_all_blocks_free(engine):
    stats = engine.stats()
    assert stats.num_free_blocks == engine.allocator.pool.num_usable_blocks
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert not engine.has_unfinished_requests()
