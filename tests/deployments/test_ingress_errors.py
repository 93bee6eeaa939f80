"""What a failed call to the LLM deployment means to the client (`deployments.ingress._map_exception`)."""

import pytest
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from deployments.ingress import _map_exception
from engine.errors import EngineError, InvalidRequestError, RequestAbortedError


def replica_raised(cause: BaseException) -> RayTaskError:
    """The exception a handle call raises when the replica's method raised `cause`."""
    return RayTaskError("generate", "Traceback: ...", cause)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (replica_raised(InvalidRequestError("prompt too long")), 400, None),
        (replica_raised(RequestAbortedError("engine core failed: EOFError()")), 503, "unavailable"),
        (RequestAbortedError("engine step failed"), 503, "unavailable"),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), 503, "overloaded"),
        (replica_raised(EngineError("unexpected")), 500, "internal_error"),
    ],
)
def test_replica_failures_map_to_openai_errors(exc: BaseException, status: int, code: str | None) -> None:
    error = _map_exception(exc)
    body = error.body()["error"]
    assert (error.status, body["code"]) == (status, code), body
    assert body["message"]
