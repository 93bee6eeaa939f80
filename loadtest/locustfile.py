"""Locust users for an OpenAI-compatible server: completions and chat, streamed and not.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -u 16 -r 4 -t 60s \
        --csv runs/x/locust --html runs/x/locust.html
    LOAD_SHAPE=steps locust -f loadtest/locustfile.py --headless --host ... --steps 1,4,16,64 --step-time 20

`make loadtest` and `python -m loadtest.run` wrap this (and then write the report).

Two user classes, equally weighted: `CompletionUser` (POST /v1/completions) and
`ChatUser` (POST /v1/chat/completions); name one on the command line to run it
alone. Each task draws a prompt from the mix (`--prompt-mix`), streams it or
not (`--stream-fraction`), then waits `--think-time` seconds.

What lands in locust's statistics:
- `POST /v1/... stream` and `POST /v1/...`: the whole request, send to last byte.
- `TTFT /v1/...`: time to first token of each streamed request (send to the first chunk with text).
- `ITL /v1/...`: mean inter-token latency of each streamed request,
  (last text chunk - first text chunk) / (completion tokens - 1).
  TTFT and ITL rows are measurements, not requests: locust's "Aggregated" row counts them too.
Token counts (from the server's `usage`) and per-request timings go to the request log,
`<--csv prefix>_requests.csv` (or `--request-log`), which `loadtest/report.py` reads, and
locust's totals at exit to `<--csv prefix>_final_stats.csv` / `_final_failures.csv`.

Every option also reads an environment variable (LOADTEST_MODEL, LOADTEST_MAX_TOKENS, ...; see --help).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # locust adds only this file's folder

from loadtest.prompts import Prompt, PromptSource, parse_mix, parse_range  # noqa: E402
from loadtest.records import RequestLog, RequestRecord, StreamReader, log_path, usage_counts  # noqa: E402
from loadtest.stages import DEFAULT_STEPS  # noqa: E402

_shape = os.environ.get("LOAD_SHAPE", "").strip().lower()
if _shape == "steps":
    from loadtest.shapes import StepLoadShape  # noqa: E402, F401  (locust runs the shape it finds here)
elif _shape not in ("", "none"):
    raise SystemExit(f"LOAD_SHAPE={_shape!r}: use 'steps', or leave it unset for -u/-r/-t")

logger = logging.getLogger("loadtest")


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--model", env_var="LOADTEST_MODEL", default="", help="Model name to send; empty: the first of GET /v1/models.")
    parser.add_argument("--max-tokens", env_var="LOADTEST_MAX_TOKENS", default="128", help="Tokens to generate: N, or a range LOW,HIGH drawn per request.")
    parser.add_argument("--prompt-mix", env_var="LOADTEST_PROMPT_MIX", default="mixed", help="mixed | short | long | shared, or weights like short=2,long=1,shared=1.")
    parser.add_argument("--long-prompt-tokens", env_var="LOADTEST_LONG_PROMPT_TOKENS", type=int, default=1000, help="Approximate size of a long prompt.")
    parser.add_argument("--shared-prefix-tokens", env_var="LOADTEST_SHARED_PREFIX_TOKENS", type=int, default=500, help="Approximate size of the preamble every shared prompt starts with.")
    parser.add_argument("--think-time", env_var="LOADTEST_THINK_TIME", default="0", help="Seconds a user waits between requests: N, or a range LOW,HIGH. 0: users = requests in flight.")
    parser.add_argument("--stream-fraction", env_var="LOADTEST_STREAM_FRACTION", type=float, default=0.5, help="Fraction of requests sent with stream: true.")
    parser.add_argument("--temperature", env_var="LOADTEST_TEMPERATURE", type=float, default=1.0, help="Sampling temperature.")
    parser.add_argument("--no-ignore-eos", env_var="LOADTEST_NO_IGNORE_EOS", action="store_true", help="Let answers stop at EOS (default: ignore_eos, so every answer is max_tokens long; an extension vLLM-style servers accept).")
    parser.add_argument("--no-stream-usage", env_var="LOADTEST_NO_STREAM_USAGE", action="store_true", help="Do not ask for stream_options.include_usage; count text chunks as tokens.")
    parser.add_argument("--api-key", env_var="OPENAI_API_KEY", default="", help="Sent as Authorization: Bearer <key>.", include_in_web_ui=False)
    parser.add_argument("--request-timeout", env_var="LOADTEST_REQUEST_TIMEOUT", type=float, default=600.0, help="Seconds before a silent request fails.")
    parser.add_argument("--request-log", env_var="LOADTEST_REQUEST_LOG", default="", help="Per-request CSV; default <--csv prefix>_requests.csv (needed with --processes: workers add .<pid>).")
    parser.add_argument("--seed", env_var="LOADTEST_SEED", type=int, default=None, help="Seed of the prompt draws (default: random).")
    parser.add_argument("--steps", env_var="LOADTEST_STEPS", default=DEFAULT_STEPS, help="LOAD_SHAPE=steps: user counts of the stages.")
    parser.add_argument("--step-time", env_var="LOADTEST_STEP_TIME", type=float, default=15.0, help="LOAD_SHAPE=steps: seconds per stage.")
    parser.add_argument("--step-ramp", env_var="LOADTEST_STEP_RAMP", type=float, default=1.0, help="LOAD_SHAPE=steps: seconds to reach a stage's user count.")


@dataclass
class Settings:
    """The parsed options, validated once per process and kept on the Environment."""

    model: str
    max_tokens: tuple[int, int]
    mix: dict[str, float]
    long_tokens: int
    shared_tokens: int
    think: tuple[float, float]
    stream_fraction: float
    temperature: float
    ignore_eos: bool
    stream_usage: bool
    api_key: str
    timeout: float
    seed: int | None
    log: RequestLog | None
    user_numbers: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def from_options(cls, opts: Any, worker: bool) -> Settings:
        low, high = parse_range(opts.max_tokens, "--max-tokens")
        if low < 1 or low != int(low) or high != int(high):
            raise ValueError(f"bad --max-tokens {opts.max_tokens!r}: whole numbers >= 1")
        if not 0.0 <= opts.stream_fraction <= 1.0:
            raise ValueError(f"bad --stream-fraction {opts.stream_fraction}: between 0 and 1")
        base = opts.request_log or (f"{opts.csv_prefix}_requests.csv" if opts.csv_prefix else "")
        return cls(
            model=opts.model,
            max_tokens=(int(low), int(high)),
            mix=parse_mix(opts.prompt_mix),
            long_tokens=opts.long_prompt_tokens,
            shared_tokens=opts.shared_prefix_tokens,
            think=parse_range(opts.think_time, "--think-time"),
            stream_fraction=opts.stream_fraction,
            temperature=opts.temperature,
            ignore_eos=not opts.no_ignore_eos,
            stream_usage=not opts.no_stream_usage,
            api_key=opts.api_key,
            timeout=opts.request_timeout,
            seed=opts.seed,
            log=RequestLog(log_path(base, worker)) if base else None,
        )


def settings_of(environment: Environment) -> Settings:
    return environment.loadtest_settings  # type: ignore[attr-defined]


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # locust used as a library without the command line
        return
    try:
        settings = Settings.from_options(opts, worker=isinstance(environment.runner, WorkerRunner))
    except ValueError as exc:
        logger.error("%s", exc)
        raise SystemExit(2) from None
    environment.loadtest_settings = settings  # type: ignore[attr-defined]
    if opts.csv_prefix:  # None on --processes workers: the master has the totals
        environment.events.quit.add_listener(lambda **_: _write_final_csv(environment, opts.csv_prefix))
    if settings.log is None and not opts.worker:
        logger.warning("no --csv or --request-log: token counts and per-stage TTFT are not recorded")


def _write_final_csv(environment: Environment, prefix: str) -> None:
    """`<prefix>_final_stats.csv` and `_final_failures.csv`: the totals at exit.

    Locust rewrites `<prefix>_stats.csv` once a second and not at exit, so that
    file misses the last second of the run; report.py reads these instead.
    """
    import csv

    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_final_stats.csv", "w", newline="", encoding="utf-8") as f:
        writer.requests_csv(csv.writer(f))
    with open(f"{prefix}_final_failures.csv", "w", newline="", encoding="utf-8") as f:
        writer.failures_csv(csv.writer(f))


@events.test_stop.add_listener
def _flush(environment: Environment, **_: Any) -> None:
    settings = getattr(environment, "loadtest_settings", None)
    if settings is not None and settings.log is not None:
        settings.log.flush()


@events.quitting.add_listener
def _close(environment: Environment, **_: Any) -> None:
    settings = getattr(environment, "loadtest_settings", None)
    if settings is not None and settings.log is not None:
        settings.log.close()


class _OpenAIUser(FastHttpUser):
    abstract = True
    endpoint = ""  # "completions" | "chat"
    path = ""
    connection_timeout = 30.0

    def __init__(self, environment: Environment) -> None:
        self.network_timeout = settings_of(environment).timeout  # read when the client is built
        super().__init__(environment)

    def wait_time(self) -> float:
        low, high = self.settings.think
        return random.uniform(low, high)

    def on_start(self) -> None:
        self.settings = settings_of(self.environment)
        number = next(self.settings.user_numbers)
        seed = None if self.settings.seed is None else self.settings.seed * 1_000_003 + number
        self.prompts = PromptSource(self.settings.mix, self.settings.long_tokens, self.settings.shared_tokens, seed)
        self.rng = random.Random(seed)
        self.headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}

    # ----- the one task -----------------------------------------------------------------------

    @task
    def generate(self) -> None:
        model = self.model()
        if model is None:
            return
        prompt = self.prompts.draw(chat=self.endpoint == "chat")
        stream = self.rng.random() < self.settings.stream_fraction
        body = self.body(model, prompt, stream)
        users = self.environment.runner.user_count if self.environment.runner is not None else 0
        if stream:
            record = self._streamed(body, prompt)
        else:
            record = self._plain(body, prompt)
        record.users = users
        if self.settings.log is not None:
            self.settings.log.write(record)

    def body(self, model: str, prompt: Prompt, stream: bool) -> dict[str, Any]:
        low, high = self.settings.max_tokens
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.rng.randint(low, high),
            "temperature": self.settings.temperature,
            "stream": stream,
        }
        if self.endpoint == "chat":
            body["messages"] = list(prompt.messages or ())
        else:
            body["prompt"] = prompt.text
        if self.settings.ignore_eos:
            body["ignore_eos"] = True
        if stream and self.settings.stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def model(self) -> str | None:
        """--model, or the first model the server lists (asked once per process)."""
        settings = self.settings
        if not settings.model:
            with self.client.get("/v1/models", headers=self.headers, catch_response=True, name="/v1/models") as resp:
                try:
                    settings.model = resp.json()["data"][0]["id"]
                except Exception:
                    resp.failure(f"cannot list models: HTTP {resp.status_code} {_snippet(resp)}")
                    return None
        return settings.model

    def _plain(self, body: dict[str, Any], prompt: Prompt) -> RequestRecord:
        name = self.path
        wall, t0 = time.time(), time.perf_counter()
        error = ""
        usage = None
        with self.client.post(self.path, json=body, headers=self.headers, catch_response=True, name=name) as resp:
            if resp.status_code != 200:
                error = _http_error(resp)
            else:
                try:
                    data = resp.json()
                    usage = data.get("usage")
                    if not data.get("choices"):
                        error = "answer without choices"
                except Exception as exc:
                    error = f"bad JSON answer: {exc!r}"[:200]
            if error:
                resp.failure(error)
            else:
                resp.success()
        t1 = time.perf_counter()
        prompt_tokens, cached, completion = usage_counts(usage)
        return RequestRecord(
            start=wall, end=wall + (t1 - t0), endpoint=self.endpoint, stream=False, prompt_kind=prompt.kind,
            ok=not error, latency_ms=(t1 - t0) * 1000, prompt_tokens=prompt_tokens, cached_tokens=cached,
            completion_tokens=completion, error=error,
        )

    def _streamed(self, body: dict[str, Any], prompt: Prompt) -> RequestRecord:
        name = f"{self.path} stream"
        headers = {**self.headers, "Accept": "text/event-stream", "Accept-Encoding": "identity"}
        wall, t0 = time.time(), time.perf_counter()
        reader = StreamReader(t0)
        error = ""
        with self.client.post(self.path, json=body, headers=headers, stream=True, catch_response=True, name=name) as resp:
            if resp.status_code != 200:
                error = _http_error(resp)
            else:
                try:
                    size = _read_events(resp, reader)
                    resp.request_meta["response_length"] = size
                    error = reader.failure() or ""
                except Exception as exc:  # a reset or a timeout mid-stream
                    error = f"stream broken: {type(exc).__name__}: {exc}"[:200]
            t1 = time.perf_counter()
            # Locust stops the clock at the headers of a stream; count the whole answer.
            resp.request_meta["response_time"] = (t1 - t0) * 1000
            if error:
                resp.failure(error)
            else:
                resp.success()
        prompt_tokens, cached, _ = usage_counts(reader.usage)
        record = RequestRecord(
            start=wall, end=wall + (t1 - t0), endpoint=self.endpoint, stream=True, prompt_kind=prompt.kind,
            ok=not error, latency_ms=(t1 - t0) * 1000, ttft_ms=reader.ttft_ms, itl_ms=reader.itl_ms,
            first_token=None if reader.first is None else wall + (reader.first - t0),
            prompt_tokens=prompt_tokens, cached_tokens=cached, completion_tokens=reader.completion_tokens, error=error,
        )
        if not error:
            self._measure("TTFT", record.ttft_ms, wall)
            self._measure("ITL", record.itl_ms, wall)
        return record

    def _measure(self, kind: str, ms: float | None, start: float) -> None:
        if ms is None:
            return
        self.environment.events.request.fire(
            request_type=kind, name=self.path, response_time=ms, response_length=0,
            response=None, context={}, exception=None, start_time=start, url=self.path,
        )


class CompletionUser(_OpenAIUser):
    endpoint = "completions"
    path = "/v1/completions"


class ChatUser(_OpenAIUser):
    endpoint = "chat"
    path = "/v1/chat/completions"


def _read_events(resp: Any, reader: StreamReader) -> int:
    """Feeds the answer's lines to `reader` as they arrive; returns the bytes read.

    geventhttpclient's `readline` returns each line as soon as it is in
    (`iter_content` would wait for whole 1 kB blocks and delay the first token).
    """
    raw = resp._response
    size = 0
    while True:
        line = raw.readline(b"\n")
        if not line:
            return size
        size += len(line)
        reader.feed_line(line, time.perf_counter())


def _snippet(resp: Any) -> str:
    try:
        return (resp.text or "")[:200]
    except Exception:
        return ""


def _http_error(resp: Any) -> str:
    """A short failure message; the same for the same cause, so locust groups them."""
    if not resp.status_code:
        err = getattr(resp, "error", None)
        return f"connection error: {type(err).__name__}: {err}"[:200]
    try:
        message = resp.json()["error"]["message"]
    except Exception:
        message = _snippet(resp)
    return f"HTTP {resp.status_code}: {message}"[:200]
