"""The checks every request passes before it reaches a scheduler: pure, no model needed.

Both engines call it: `LLMEngine.validate` in-process, and the engine-core
client in the serving process (so a bad request is refused before it costs
a round trip to the core).
"""

from __future__ import annotations

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


def validate_request(token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Raises InvalidRequestError for a prompt or sampling values the engine cannot serve."""
    if not token_ids:
        raise InvalidRequestError("the prompt is empty")
    bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt holds token ids outside [0, {vocab_size}): {bad[:5]}")
    params.validate()
    if len(token_ids) + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"the model's context of {max_model_len} tokens"
        )
