"""What one load-test request measured, how a streamed answer is read, and the per-request log.

No locust import here (it monkey-patches the process), so the parsing and the
log format are unit-tested on their own; `locustfile.py` and `report.py` both
use this module, so the log's columns are defined once.

The per-request log (`<csv prefix>_requests.csv`, one row per finished
request) is what `report.py` cuts into load stages: locust's own CSVs hold
latency percentiles but no token counts and no time to first token per stage.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any


@dataclass
class RequestRecord:
    start: float  # unix seconds, when the request was sent
    end: float  # unix seconds, when the last byte arrived
    endpoint: str  # "completions" | "chat"
    stream: bool
    prompt_kind: str  # "short" | "long" | "shared"
    ok: bool
    latency_ms: float  # whole request, send to last byte
    ttft_ms: float | None = None  # send to the first chunk carrying text (stream only)
    itl_ms: float | None = None  # mean gap between tokens after the first (stream only)
    first_token: float | None = None  # unix seconds of the first text chunk (stream only)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache
    completion_tokens: int = 0
    users: int = 0  # users running in this locust process when the request was sent
    error: str = ""


COLUMNS = [f.name for f in fields(RequestRecord)]


class StreamReader:
    """Accumulates the server-sent events of one streamed completion or chat completion.

    Feed it the `data:` payloads as they arrive, each with its arrival time
    (seconds, any monotonic clock shared with `sent_at`). Token counts come
    from the final usage chunk when the server sends one (`stream_options:
    {include_usage: true}`), else from the number of text chunks.
    """

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.first: float | None = None
        self.last: float | None = None
        self.text_chunks = 0
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.done = False

    def feed_line(self, line: str | bytes, now: float) -> None:
        """One line of the event stream; only `data:` lines matter."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        line = line.strip()
        if line.startswith("data:"):
            self.feed(line[5:].strip(), now)

    def feed(self, data: str, now: float) -> None:
        if data == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            self.error = f"bad event: {data[:80]!r}"
            return
        if "error" in event:
            err = event["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                if self.first is None:
                    self.first = now
                self.last = now
                self.text_chunks += 1

    @property
    def completion_tokens(self) -> int:
        if self.usage is not None:
            return int(self.usage.get("completion_tokens") or 0)
        return self.text_chunks

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.sent_at) * 1000

    @property
    def itl_ms(self) -> float | None:
        """Mean inter-token latency: (last text - first text) / (tokens - 1); None below 2 tokens."""
        n = self.completion_tokens
        if self.first is None or self.last is None or n < 2:
            return None
        return (self.last - self.first) * 1000 / (n - 1)

    def failure(self) -> str | None:
        """Why the stream counts as failed, or None."""
        if self.error is not None:
            return self.error
        if not self.done:
            return "stream ended without [DONE]"
        return None


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens from an OpenAI usage object (zeros when absent)."""
    if not usage:
        return 0, 0, 0
    details = usage.get("prompt_tokens_details") or {}
    return (
        int(usage.get("prompt_tokens") or 0),
        int(details.get("cached_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
    )


class RequestLog:
    """Appends RequestRecords to a CSV; the file is created at the first record (a master process writes none)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._writer: Any = None

    def write(self, record: RequestRecord) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
            self._writer.writeheader()
        row = asdict(record)
        for key in ("start", "end", "first_token"):
            if row[key] is not None:
                row[key] = f"{row[key]:.6f}"
        for key in ("latency_ms", "ttft_ms", "itl_ms"):
            if row[key] is not None:
                row[key] = f"{row[key]:.3f}"
        row["stream"] = int(record.stream)
        row["ok"] = int(record.ok)
        self._writer.writerow({k: "" if v is None else v for k, v in row.items()})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None


def log_path(base: str | Path, worker: bool) -> Path:
    """The request log's path; a worker of `locust --processes` writes `<base>.<pid>.csv` beside it."""
    path = Path(base)
    if not worker:
        return path
    return path.with_name(f"{path.name.removesuffix('.csv')}.{os.getpid()}.csv")


def read_records(paths: list[Path]) -> list[RequestRecord]:
    records = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                records.append(_from_row(row))
    records.sort(key=lambda r: r.start)
    return records


def _from_row(row: dict[str, str]) -> RequestRecord:
    def num(key: str) -> float | None:
        value = row.get(key, "")
        return float(value) if value not in ("", None) else None

    return RequestRecord(
        start=float(row["start"]),
        end=float(row["end"]),
        endpoint=row["endpoint"],
        stream=row["stream"] in ("1", "True", "true"),
        prompt_kind=row.get("prompt_kind", ""),
        ok=row["ok"] in ("1", "True", "true"),
        latency_ms=float(row["latency_ms"]),
        ttft_ms=num("ttft_ms"),
        itl_ms=num("itl_ms"),
        first_token=num("first_token"),
        prompt_tokens=int(row.get("prompt_tokens") or 0),
        cached_tokens=int(row.get("cached_tokens") or 0),
        completion_tokens=int(row.get("completion_tokens") or 0),
        users=int(row.get("users") or 0),
        error=row.get("error", ""),
    )
