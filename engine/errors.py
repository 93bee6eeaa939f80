"""The engine's own exception types.

Every problem with one request is an `InvalidRequestError`: the caller gets a
clear message and the engine keeps serving everyone else.
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine refuses: bad sampling values, a prompt too long, unknown token ids."""


class ConfigError(EngineError, ValueError):
    """An engine configuration that cannot work (bad sizes, a mode the device cannot run)."""


class RequestAbortedError(EngineError):
    """Raised inside a request's stream when the engine stops while the request is running."""
