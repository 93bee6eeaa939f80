"""OpenAI-style error bodies, and the mapping from what can go wrong to an HTTP status.

Every failure a client can cause is a 4xx with a message that says what to
change; overload is a 503 the client may retry; only our own bugs are 500s.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from deployments.protocol import ErrorInfo, ErrorResponse


class OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def overloaded(message: str = "the server is overloaded; retry later") -> OpenAIError:
    return OpenAIError(503, message, "server_overloaded", code="overloaded")


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, "service_unavailable", code="unavailable")


def internal(message: str) -> OpenAIError:
    return OpenAIError(500, message, "internal_error", code="internal_error")


def from_validation_errors(errors: list[dict[str, Any]]) -> OpenAIError:
    """One 400 from FastAPI/pydantic's error list: the first problem, named by its field."""
    first = errors[0] if errors else {"msg": "invalid request body", "loc": ()}
    # loc starts with "body"; the rest is the field path, with union-member names mixed in.
    path = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(p for p in path if not _is_union_member(p)) or None
    message = str(first.get("msg", "invalid request body")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", code="invalid_json")
    if not path and first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        return bad_request("the body must be a JSON object", code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return bad_request(f"unrecognized request argument: {param}", param=param)
    if first.get("type") == "missing":
        return bad_request(f"missing required parameter: {param}", param=param)
    return bad_request(f"{param}: {message}" if param else message, param=param)


def _is_union_member(part: str) -> bool:
    """A union member's name in an error location (`str`, `list[int]`, ...), not a field name such as `stream`."""
    return part in ("str", "int", "float", "bool") or part.startswith(("function-", "list[", "dict["))
