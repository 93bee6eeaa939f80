"""Our inference engine: one process, one device, no Ray.

    from engine import LLMEngine, SamplingParams
    engine = LLMEngine.from_pretrained("models/demo-target")
    print(engine.generate(["def fibonacci(n):"], SamplingParams(max_tokens=32, temperature=0))[0].outputs[0].text)
"""

from engine.config import CacheConfig, EngineConfig, QuantConfig, SchedulerConfig, SpeculativeConfig
from engine.errors import ConfigError, EngineError, InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # The engines pull in torch and the model code; import them only when asked for.
    if name == "LLMEngine":
        from engine.engine import LLMEngine

        return LLMEngine
    if name == "AsyncLLMEngine":
        from engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(name)


__all__ = [
    "AsyncLLMEngine",
    "CacheConfig",
    "CompletionOutput",
    "ConfigError",
    "EngineConfig",
    "EngineError",
    "InvalidRequestError",
    "LLMEngine",
    "QuantConfig",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "SpeculativeConfig",
    "TokenLogprob",
]
