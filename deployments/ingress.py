"""The HTTP face: an OpenAI-compatible API as a FastAPI app in a Serve deployment.

It validates bodies, tokenizes (so the router can hash the prompt), calls an
LLM replica through a Serve handle and shapes the answer; `stream: true`
answers are server-sent events. The responding replica's id is returned in
the `x-replica-id` header. Client errors are 4xx with an OpenAI error body,
overload is 503 (`max_queued_requests` exceeded), never a 500.

No `from __future__ import annotations` here: FastAPI must resolve the route
signatures of the Serve-wrapped class. And every helper the class uses is
defined above it, because Serve serializes the class when it is decorated.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import errors
from deployments.config import AppConfig
from deployments.direct_http import DirectHTTPServer
from deployments.errors import OpenAIError
from deployments.gc_pauses import GcPauses
from deployments.loop_lag import LoopLag
from deployments.messages import GenerateOutput, GenerateRequest, ModelInfo
from deployments.metrics import IngressMetrics
from deployments.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from deployments.ray_env import set_switch_interval
from deployments.serving import ChatShaper, CompletionShaper, Prompts, load_ingress_tokenizer, sampling_params
from deployments.server_timing import add_handler_time, format_end_timing, format_server_timing
from engine.cpu_affinity import pin_process
from engine.errors import InvalidRequestError, RequestAbortedError

logger = logging.getLogger("ray.serve")

app = FastAPI(title="rayllm: OpenAI-compatible API")

BodyT = TypeVar("BodyT", bound=BaseModel)

# Tokenizing a prompt longer than this many characters goes to a thread, off the event loop.
_INLINE_TOKENIZE_CHARS = 8192


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return errors.from_validation_errors(list(exc.errors())).response()


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return OpenAIError(exc.status_code, str(exc.detail), kind).response()


def _map_exception(exc: BaseException) -> OpenAIError:
    """What a failed call to the LLM deployment means to the client."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause  # the replica's own exception
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, BackPressureError):
        return errors.overloaded()
    if isinstance(exc, InvalidRequestError):  # Ray re-raises the replica's error as a subclass of it
        return errors.bad_request(str(exc))
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return errors.unavailable("the model replica is unavailable; retry later")
    if isinstance(exc, RequestAbortedError):  # the replica's engine died under the request: the replica goes next
        return errors.unavailable("the model replica stopped while running the request; retry later")
    logger.exception("request failed", exc_info=exc)
    return errors.internal(f"internal error: {type(exc).__name__}")


def _replica_header(outputs: list[GenerateOutput]) -> dict[str, str]:
    return {"x-replica-id": ",".join(dict.fromkeys(o.replica_id for o in outputs))}


def direct_app(ingress: "OpenAIIngress") -> FastAPI:
    """The same routes and error bodies as `app`, bound to one ingress replica, for its own listener."""
    direct = FastAPI(title="LLM serving (direct)", docs_url=None, redoc_url=None, openapi_url=None)
    direct.add_exception_handler(RequestValidationError, _validation_error)
    direct.add_exception_handler(OpenAIError, _openai_error)
    direct.add_exception_handler(StarletteHTTPException, _http_error)
    direct.add_api_route("/health", ingress.health, methods=["GET"])
    direct.add_api_route("/v1/models", ingress.models, methods=["GET"])
    direct.add_api_route("/metrics", ingress.metrics, methods=["GET"])
    direct.add_api_route("/v1/completions", ingress.completions, methods=["POST"])
    direct.add_api_route("/v1/chat/completions", ingress.chat_completions, methods=["POST"])
    return direct


def _sse(body: dict[str, Any] | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, llm: DeploymentHandle, config: AppConfig) -> None:
        # gRPC passes each request and chunk by value: no object-store round trip per message.
        # Plain pickle for them (our messages are module-level dataclasses): Serve's default,
        # cloudpickle, took 3.4x as long per chunk, on the LLM replica's loop (BENCHMARKS.md, W2).
        self._llm = llm.options(
            _by_reference=config.handle_transport == "ray", request_serialization="pickle", response_serialization="pickle"
        )
        self._llm_stream = self._llm.options(stream=True)
        self._config = config
        set_switch_interval(config.gil_switch_interval_s)
        plan = config.cpu_plan()
        if plan is not None:  # off the engine cores' CPUs (engine/cpu_affinity.py)
            pin_process(plan.others)
        self._prompts = Prompts(load_ingress_tokenizer(config))
        # The wait a request sees on this replica's loop before any code of ours runs (/metrics).
        self._loop_lag = LoopLag()
        self._gc_pauses = GcPauses()
        self._gc_pauses.start()
        self._metrics = IngressMetrics(self._loop_lag, serve.get_replica_context().replica_id.to_full_id_str(), self._gc_pauses)
        self._info: ModelInfo | None = None
        self._index: Any = None  # the prefix index actor, for /metrics
        direct = config.ingress_direct_http
        # The constructor runs on the replica's event loop, which the listener then shares.
        self._direct = None if direct is None else DirectHTTPServer(direct_app(self), direct.host, direct.port)

    # ----- plain endpoints -------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        info = await self._model_info()
        return ModelList(data=[ModelCard(id=self._config.model_name, max_model_len=info.max_model_len)])

    @app.get("/metrics")
    async def metrics(self) -> Response:
        stats = await self._replica_stats()
        return Response(self._metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ----- generation ------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._answer("completions", request, CompletionRequest, self._completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._answer("chat", request, ChatCompletionRequest, self._chat)

    async def _answer(
        self, endpoint: str, request: Request, body_type: type[BodyT], handler: Callable[[BodyT], Awaitable[Response]]
    ) -> Response:
        """Auth, body validation, error mapping and request metrics around one generation handler.

        The body is validated here rather than by FastAPI, so that rejected
        bodies are counted in the metrics like every other answer.
        """
        status = "500"
        entered = time.monotonic()
        self._loop_lag.ensure_started()
        self._metrics.in_progress.inc()
        try:
            self._authorize(request)
            try:
                body = body_type.model_validate_json(await request.body())
            except ValidationError as exc:
                raise errors.from_validation_errors(list(exc.errors(include_url=False))) from None
            response = await handler(body)
            status = str(response.status_code)
            if "server-timing" in response.headers:
                response.headers["server-timing"] = add_handler_time(response.headers["server-timing"], time.monotonic() - entered)
            return response
        except asyncio.CancelledError:
            status = "499"  # the client went away
            raise
        except Exception as exc:
            error = _map_exception(exc)
            status = str(error.status)
            return error.response()
        finally:
            self._metrics.in_progress.dec()
            self._metrics.requests.labels(endpoint, status).inc()

    async def _completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        info = await self._model_info()
        try:
            prompts = body.prompts()
        except ValueError as exc:
            raise errors.bad_request(str(exc), param="prompt") from None
        if body.stream and len(prompts) > 1:
            raise errors.bad_request("stream: true takes one prompt per request", param="prompt")
        token_ids = [await self._encode(p, info) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        calls = [self._request(f"{rid}-{i}", ids, body, info) for i, ids in enumerate(token_ids)]
        shaper = CompletionShaper(body, self._prompts, rid, self._config.model_name)
        if body.stream:
            return await self._stream(calls[0], shaper.chunk, shaper.usage_chunk, body.include_usage_in_stream)
        start = time.monotonic()
        outputs = await self._generate_all(calls)
        for out in outputs:
            self._metrics.observe_finished(out, time.monotonic() - start)
        prompt_texts = [p if isinstance(p, str) else self._prompts.decode(p) for p in prompts] if body.echo else [""] * len(prompts)
        return JSONResponse(shaper.response(outputs, prompt_texts).model_dump(), headers=_replica_header(outputs))

    async def _chat(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        info = await self._model_info()
        ids = await asyncio.to_thread(self._prompts.chat, body, info) if self._is_long(body) else self._prompts.chat(body, info)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        call = self._request(rid, ids, body, info)
        shaper = ChatShaper(body, self._prompts, rid, self._config.model_name)
        if body.stream:
            return await self._stream(call, shaper.chunks, shaper.usage_chunk, body.include_usage_in_stream)
        start = time.monotonic()
        (out,) = await self._generate_all([call])
        self._metrics.observe_finished(out, time.monotonic() - start)
        return JSONResponse(shaper.response(out).model_dump(), headers=_replica_header([out]))

    def _request(
        self, request_id: str, token_ids: list[int], body: CompletionRequest | ChatCompletionRequest, info: ModelInfo
    ) -> GenerateRequest:
        params = sampling_params(body, len(token_ids), info, self._config)
        return GenerateRequest(request_id, token_ids, params, detokenize=not self._prompts.makes_text(params))

    async def _generate_all(self, calls: list[GenerateRequest]) -> list[GenerateOutput]:
        response = self._llm.generate.remote(calls[0]) if len(calls) == 1 else self._llm.generate_many.remote(calls)
        try:
            result = await response
        except asyncio.CancelledError:
            # Ray's own cancel of this handler reaches the call below it; an asyncio cancel
            # (the gRPC proxy's, or a departed client's) does not: cancel it by hand.
            response.cancel()
            raise
        outputs = [result] if len(calls) == 1 else result
        for call, out in zip(calls, outputs):
            if (text := self._prompts.text_maker(call)) is not None:
                text.fill(out)
        return outputs

    async def _stream(
        self,
        call: GenerateRequest,
        to_chunks: Callable[[GenerateOutput], Iterable[dict[str, Any]] | dict[str, Any] | None],
        usage_chunk: Callable[[GenerateOutput], dict[str, Any]],
        include_usage: bool,
    ) -> Response:
        start, sent_unix_s = time.monotonic(), time.time()
        text = self._prompts.text_maker(call)
        gen: DeploymentResponseGenerator = self._llm_stream.generate_stream.remote(call)
        try:
            # Wait for the first output before answering 200, so a request the engine
            # rejects (or an overload) still gets its proper status code.
            first: GenerateOutput = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        if text is not None:
            text.fill(first)

        async def events() -> AsyncIterator[str]:
            # One write per engine output, not per SSE event: each write is a message
            # from this replica to the HTTP proxy. The last one also carries usage and [DONE].
            total = first
            finished = False
            pending: list[str] = []
            try:
                out: GenerateOutput | None = first
                while out is not None:
                    produced = to_chunks(out)
                    pending += [_sse(c) for c in ([produced] if isinstance(produced, dict) else (produced or []))]
                    if out.finished:
                        break
                    if pending:
                        yield "".join(pending)
                        pending = []
                    out = await anext(gen, None)
                    if out is not None and out is not first:
                        if text is not None:
                            text.fill(out)
                        total.merge(out)
                finished = True
                self._metrics.observe_finished(total, time.monotonic() - start)
                if include_usage:
                    pending.append(_sse(usage_chunk(total)))
                pending.append(format_end_timing(total.timing, time.time()))
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # headers are out: report in-band, as OpenAI does
                pending.append(_sse(_map_exception(exc).body()))
            finally:
                if not finished:
                    gen.cancel()  # the client left: abort on the replica, free its blocks
            yield "".join(pending) + _sse("[DONE]")

        headers = {"x-replica-id": first.replica_id, "cache-control": "no-cache"}
        headers["server-timing"] = format_server_timing(first, sent_unix_s, time.time(), call.accepted_unix_s)
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # ----- helpers ---------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self._config.api_key
        if key is None:
            return
        if not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
            raise OpenAIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", "authentication_error", code="invalid_api_key")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._config.model_name:
            raise OpenAIError(
                404, f"the model {model!r} does not exist; this server serves {self._config.model_name!r}",
                "invalid_request_error", param="model", code="model_not_found",
            )

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self._llm.model_info.remote()
        return self._info

    def _is_long(self, body: ChatCompletionRequest) -> bool:
        return sum(len(m.text()) for m in body.messages) > _INLINE_TOKENIZE_CHARS

    async def _encode(self, prompt: str | list[int], info: ModelInfo) -> list[int]:
        if isinstance(prompt, str) and len(prompt) > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self._prompts.encode, prompt, info)
        return self._prompts.encode(prompt, info)

    async def _replica_stats(self) -> dict[str, dict[str, Any]]:
        """Per-replica engine stats from the prefix index; {} if it cannot be reached quickly."""
        try:
            if self._index is None:
                info = await asyncio.wait_for(self._model_info(), 5.0)
                if info.prefix_index is None:
                    return {}
                name, namespace = info.prefix_index
                self._index = await asyncio.to_thread(ray.get_actor, name, namespace=namespace)
            return await asyncio.wait_for(asyncio.wrap_future(self._index.stats.remote().future()), 5.0)
        except Exception as exc:
            logger.warning("could not read replica stats for /metrics: %r", exc)
            self._index = None
            return {}
