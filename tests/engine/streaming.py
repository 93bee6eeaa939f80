"""Helpers shared by the tests of the two async engines (AsyncLLMEngine and EngineCoreClient)."""

from __future__ import annotations

import asyncio


async def collect(engine, prompt, params, request_id: str, **kwargs) -> list:
    """Every output of one request's stream."""
    return [out async for out in engine.generate(prompt, params, request_id, **kwargs)]


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def check_paced_stream(outs: list, num_tokens: int) -> None:
    """A stream paced with a long chunk interval: woken for the first token, then at the end only.

    So the steps reach the consumer as at most two outputs (one, when every
    step ran before the consumer took the first), and nothing is lost.
    """
    assert 1 <= len(outs) <= 2 and outs[-1].finished
    assert sum((o.outputs[0].new_token_ids for o in outs), []) == outs[-1].outputs[0].token_ids
    assert len(outs[-1].outputs[0].token_ids) == num_tokens
