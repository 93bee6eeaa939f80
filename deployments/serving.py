"""OpenAI requests -> engine requests, and replica outputs -> OpenAI responses.

Pure functions and one small tokenizer wrapper: no Ray, no HTTP, so the
ingress stays a thin layer and this is unit-testable on its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.config import AppConfig
from deployments.errors import bad_request
from deployments.messages import ChoiceDelta, GenerateOutput, GenerateRequest, ModelInfo
from deployments.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


def load_ingress_tokenizer(config: AppConfig) -> Any | None:
    """The model's tokenizer, or None (a preset, or a folder without one: token-id prompts only)."""
    from engine.tokenizer import load_tokenizer

    source = config.tokenizer or config.model
    if source.startswith("preset:"):
        return None
    if Path(source).is_dir():
        return load_tokenizer(source)
    from transformers import AutoTokenizer  # a hub id: works where the hub (or its cache) is reachable

    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError:
        return None


class Prompts:
    """Prompt text / chat messages -> token ids, and token ids -> display strings."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer

    def encode(self, prompt: str | list[int], info: ModelInfo, param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this model has no tokenizer: send the prompt as token ids", param=param)
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < info.vocab_size]
            if bad:
                raise bad_request(f"token ids outside the vocabulary [0, {info.vocab_size}): {bad[:5]}", param=param)
        if not ids:
            raise bad_request("the prompt is empty", param=param)
        return ids

    def chat(self, request: ChatCompletionRequest, info: ModelInfo) -> list[int]:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in request.messages]
        try:
            text = tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                **(request.chat_template_kwargs or {}),
            )
        except Exception as exc:  # the template's own raise_exception(), e.g. roles out of order
            raise bad_request(f"the chat template rejected the messages: {exc}", param="messages") from None
        # The template writes any BOS itself; adding special tokens again would double it.
        return self.encode(text, info, param="messages")

    def makes_text(self, params: SamplingParams) -> bool:
        """Whether the ingress turns this request's tokens into text (GenerateRequest.detokenize off):
        with a tokenizer here and no stop strings, which only the engine, matching text as it goes, checks."""
        return self.tokenizer is not None and not params.stop

    def text_maker(self, request: GenerateRequest) -> TextMaker | None:
        """The decoder of a request whose replica sends no text; None when it does."""
        return None if request.detokenize else TextMaker(self.tokenizer)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])


class TextMaker:
    """The text of one request's outputs, from their token ids, for a replica that sent none.

    Each LLM replica's event loop admits every request it serves, one at a time (gRPC's
    server takes new calls one by one): turning tokens into text there made that loop, the
    shared bottleneck, slower for everyone (BENCHMARKS.md, W2). The ingress replicas are
    many and each has time to spare, so they do it, with the same incremental decoding the
    engine uses, one decoder per choice.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._decoders: dict[int, IncrementalDetokenizer] = {}

    def fill(self, output: GenerateOutput) -> GenerateOutput:
        """Sets the text of each choice of `output` (a delta, or a whole answer) from its new tokens."""
        for choice in output.choices:
            if choice.token_ids:
                decoder = self._decoders.get(choice.index)
                if decoder is None:
                    decoder = self._decoders[choice.index] = IncrementalDetokenizer(self._tokenizer, [])
                choice.text = decoder.add(choice.token_ids)[0]
        return output


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest,
    prompt_len: int,
    info: ModelInfo,
    config: AppConfig,
) -> SamplingParams:
    """SamplingParams for one prompt, after the context-length checks OpenAI clients expect."""
    param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    room = info.max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"the prompt is {prompt_len} tokens; this model's context is {info.max_model_len} tokens",
            param=param,
            code="context_length_exceeded",
        )
    if isinstance(request, ChatCompletionRequest):
        requested = request.requested_max_tokens
        default = config.default_max_tokens or room
        max_tokens_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        logprobs = request.num_logprobs
    else:
        explicit = "max_tokens" in request.model_fields_set and request.max_tokens is not None
        requested = request.max_tokens if explicit else None
        default = config.default_max_tokens or 16
        max_tokens_param = "max_tokens"
        logprobs = request.logprobs
    # A default shrinks to fit the context; only an explicit request too large is an error.
    max_tokens = requested if requested is not None else min(default, room)
    if max_tokens > room:
        raise bad_request(
            f"max_tokens is too large: the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
            f"this model's context of {info.max_model_len} tokens",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            n=request.n,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=list(request.stop or []),
            stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
        )
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from None


def usage(outputs: list[GenerateOutput]) -> Usage:
    prompt = sum(o.prompt_tokens for o in outputs)
    completion = sum(o.num_generated_tokens for o in outputs)
    cached = sum(o.cached_tokens for o in outputs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


# ----- /v1/completions -----------------------------------------------------------------------


@dataclass
class CompletionShaper:
    """Builds completion bodies; `index` of a choice = prompt number * n + its index."""

    request: CompletionRequest
    prompts: Prompts
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    _offsets: dict[int, int] = field(default_factory=dict)  # text offset per choice, for logprobs

    def response(self, outputs: list[GenerateOutput], prompt_texts: list[str]) -> CompletionResponse:
        choices = []
        for p, (out, prompt_text) in enumerate(zip(outputs, prompt_texts)):
            for c in out.choices:
                prefix = prompt_text if self.request.echo else ""
                choices.append(
                    CompletionChoice(
                        index=p * self.request.n + c.index,
                        text=prefix + c.text,
                        logprobs=self._logprobs(p * self.request.n + c.index, c, len(prefix)),
                        finish_reason=c.finish_reason,
                    )
                )
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage(outputs))

    def chunk(self, delta: GenerateOutput) -> dict[str, Any] | None:
        choices = [
            CompletionChoice(index=c.index, text=c.text, logprobs=self._logprobs(c.index, c, 0), finish_reason=c.finish_reason)
            for c in delta.choices
        ]
        if not choices:
            return None
        body = CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices)
        return body.model_dump(exclude={"usage"})

    def usage_chunk(self, total: GenerateOutput) -> dict[str, Any]:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage([total])
        ).model_dump()

    def _logprobs(self, key: int, choice: ChoiceDelta, start_offset: int) -> CompletionLogprobs | None:
        if self.request.logprobs is None or choice.logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(key, start_offset)
        for lp in choice.logprobs:
            token = self.prompts.token_str(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.prompts.token_str(t): v for t, v in lp.top.items()})
            out.text_offset.append(offset)
            offset += len(token)
        self._offsets[key] = offset
        return out


# ----- /v1/chat/completions ------------------------------------------------------------------


@dataclass
class ChatShaper:
    request: ChatCompletionRequest
    prompts: Prompts
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    _started: set[int] = field(default_factory=set)  # choices whose role chunk went out

    def response(self, output: GenerateOutput) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self._logprobs(c),
                finish_reason=c.finish_reason,
            )
            for c in output.choices
        ]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage([output]))

    def chunks(self, delta: GenerateOutput) -> Iterator[dict[str, Any]]:
        for c in delta.choices:
            if c.index not in self._started:
                # OpenAI opens each choice with a role-only delta.
                self._started.add(c.index)
                yield self._chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content="")))
            if c.text or c.logprobs:
                yield self._chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(content=c.text), logprobs=self._logprobs(c)))
            if c.finish_reason is not None:
                yield self._chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=c.finish_reason))

    def usage_chunk(self, total: GenerateOutput) -> dict[str, Any]:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage([total])
        ).model_dump()

    def _chunk(self, choice: ChatChunkChoice) -> dict[str, Any]:
        body = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=[choice])
        out = body.model_dump(exclude={"usage"})
        # As OpenAI: a delta holds only what it sets ({} on the closing chunk).
        out["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)
        return out

    def _logprobs(self, choice: ChoiceDelta) -> ChatLogprobs | None:
        if not self.request.logprobs or choice.logprobs is None:
            return None
        return ChatLogprobs(content=[self._token_logprob(lp) for lp in choice.logprobs])

    def _token_logprob(self, lp: TokenLogprob) -> ChatTokenLogprob:
        token = self.prompts.token_str(lp.token_id)
        top = [
            TopLogprob(token=(s := self.prompts.token_str(t)), logprob=v, bytes=list(s.encode()))
            for t, v in lp.top.items()
        ]
        return ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top)
