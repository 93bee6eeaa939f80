"""The load-test report: per-stage throughput and latency percentiles, as a table, a plot and one line.

    python -m loadtest.report runs/loadtest-X/locust [--out runs/loadtest-X] [--device "1x H100"] [--command "..."]

Reads what a locust run with `--csv <prefix>` left behind:
- `<prefix>_stats_history.csv`: the user count over time (locust writes a row each second),
  which cuts the run into stages (one per user count held at least `--min-stage-s`);
- `<prefix>_requests*.csv`: one row per request from `locustfile.py` (tokens, TTFT, ITL);
- `<prefix>_final_stats.csv` and `<prefix>_final_failures.csv` (written by the locustfile at exit;
  else locust's `<prefix>_stats.csv` and `_failures.csv`): locust's totals and failure messages.

Per stage [start, end) it reports, over the requests that *started* in it
(after `--warmup-s`): TTFT, ITL and whole-request latency p50/p99, and
failures; over the stage's time: req/s (successful requests that *finished*
in it) and output tok/s (each request's tokens spread evenly from its first
token to its last byte, so a request that spans two stages counts in both).

Writes report.md, report.json and plot.png (with matplotlib) into --out and
prints the `Load:` line of the stage with the most users.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.records import RequestRecord, read_records  # noqa: E402


@dataclass
class Stage:
    users: int
    start: float  # unix seconds
    end: float
    requests: int = 0  # started in the stage
    failures: int = 0  # of those
    req_s: float = 0.0
    tok_s: float = 0.0
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    itl_p50: float | None = None
    itl_p99: float | None = None
    latency_p50: float | None = None
    latency_p99: float | None = None
    prompt_tokens_mean: float | None = None
    completion_tokens_mean: float | None = None
    cached_pct: float | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----- inputs ---------------------------------------------------------------------------------


def read_timeline(path: Path) -> list[tuple[float, int]]:
    """(unix time, users) of locust's Aggregated history rows, in time order."""
    if not path.is_file():
        return []
    timeline = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":
                timeline.append((float(row["Timestamp"]), int(float(row["User Count"]))))
    timeline.sort()
    return timeline


def read_locust_stats(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def request_logs(prefix: Path) -> list[Path]:
    """`<prefix>_requests.csv` and the per-worker `<prefix>_requests.<pid>.csv`."""
    return sorted(prefix.parent.glob(f"{prefix.name}_requests*.csv"))


# ----- stages ---------------------------------------------------------------------------------


def find_stages(timeline: list[tuple[float, int]], records: list[RequestRecord], min_stage_s: float) -> list[Stage]:
    """Windows of constant user count: from the history, else (no history) from the records' own `users`."""
    if timeline and any(users > 0 for _, users in timeline):
        segments: list[list[float]] = []  # runs of one user count: [users, first sample, last sample]
        for t, users in timeline:
            if segments and segments[-1][0] == users:
                segments[-1][2] = t
            else:
                segments.append([users, t, t])
        by_users: dict[int, Stage] = {}
        for i, (users, first, last) in enumerate(segments):
            users = int(users)
            prev = segments[i - 1] if i else None
            nxt = segments[i + 1] if i + 1 < len(segments) else None
            # A count changed somewhere between two samples; that gap (the ramp) belongs to no stage,
            # except when rising from idle (nothing ran before) or stopping (nothing new started).
            start = prev[2] if prev is not None and prev[0] == 0 else first
            end = last + 1.0 if nxt is None else (nxt[1] if nxt[0] == 0 else last)
            if users <= 0 or end - start < min_stage_s:
                continue  # idle, or a count passed through while ramping
            if users in by_users:  # the same count again later: one stage, from its first start to its last end
                by_users[users].end = end
            else:
                by_users[users] = Stage(users, start, end)
        return sorted(by_users.values(), key=lambda s: s.start)
    groups: dict[int, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.users, []).append(r)
    return [
        Stage(users, min(r.start for r in rs), max(r.end for r in rs))
        for users, rs in sorted(groups.items())
        if users > 0
    ]


def fill_stage(stage: Stage, records: list[RequestRecord], warmup_s: float = 0.0) -> Stage:
    a, b = stage.start + warmup_s, stage.end
    window = max(b - a, 1e-9)
    started = [r for r in records if a <= r.start < b]
    ok = [r for r in started if r.ok]
    stage.requests = len(started)
    stage.failures = len(started) - len(ok)
    stage.req_s = sum(1 for r in records if r.ok and a <= r.end < b) / window
    tokens = 0.0
    for r in records:
        if not r.ok or r.completion_tokens <= 0:
            continue
        t0 = r.first_token if r.first_token is not None else r.start
        overlap = min(r.end, b) - max(t0, a)
        if overlap <= 0:
            continue
        span = r.end - t0
        tokens += r.completion_tokens * (overlap / span if span > 0 else 1.0)
    stage.tok_s = tokens / window
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    itl = [r.itl_ms for r in ok if r.itl_ms is not None]
    latency = [r.latency_ms for r in ok]
    stage.ttft_p50, stage.ttft_p99 = percentile(ttft, 50), percentile(ttft, 99)
    stage.itl_p50, stage.itl_p99 = percentile(itl, 50), percentile(itl, 99)
    stage.latency_p50, stage.latency_p99 = percentile(latency, 50), percentile(latency, 99)
    if ok:
        prompt = sum(r.prompt_tokens for r in ok)
        stage.prompt_tokens_mean = prompt / len(ok)
        stage.completion_tokens_mean = sum(r.completion_tokens for r in ok) / len(ok)
        stage.cached_pct = 100 * sum(r.cached_tokens for r in ok) / prompt if prompt else None
    return stage


@dataclass
class Report:
    stages: list[Stage]
    total_requests: int
    total_failures: int
    locust_stats: list[dict[str, str]]
    failure_messages: list[dict[str, str]]
    device: str
    command: str
    title: str

    def headline(self) -> Stage | None:
        return max(self.stages, key=lambda s: (s.users, s.start)) if self.stages else None

    def load_line(self) -> str:
        s = self.headline()
        if s is None:
            return f"Load: no stages, failures {self.total_failures} ({self.device}, {self.command})"
        return (
            f"Load: {s.users} users, {s.req_s:.1f} req/s, {s.tok_s:.0f} tok/s, "
            f"TTFT p50/p99 {_ms(s.ttft_p50)}/{_ms(s.ttft_p99)} ms, failures {self.total_failures} "
            f"({self.device}, {self.command})"
        )


def build_report(
    prefix: str | Path,
    device: str = "unknown device",
    command: str = "",
    title: str = "",
    min_stage_s: float = 3.0,
    warmup_s: float = 0.0,
) -> Report:
    prefix = Path(prefix)
    logs = request_logs(prefix)
    if not logs:
        raise FileNotFoundError(f"no request log {prefix}_requests*.csv (run locust with loadtest/locustfile.py and --csv {prefix})")
    records = read_records(logs)
    timeline = read_timeline(Path(f"{prefix}_stats_history.csv"))
    stages = [fill_stage(s, records, warmup_s) for s in find_stages(timeline, records, min_stage_s)]
    # The locustfile's totals at exit; locust's own files miss the run's last second.
    locust_stats = read_locust_stats(_first_file(f"{prefix}_final_stats.csv", f"{prefix}_stats.csv"))
    failures = read_locust_stats(_first_file(f"{prefix}_final_failures.csv", f"{prefix}_failures.csv"))
    aggregated = next((row for row in locust_stats if row.get("Name") == "Aggregated"), None)
    total_failures = sum(1 for r in records if not r.ok)
    if aggregated is not None:
        # Locust's count also has failures the request log cannot see (GET /v1/models).
        total_failures = max(total_failures, int(aggregated["Failure Count"]))
    return Report(stages, len(records), total_failures, locust_stats, failures, device, command, title)


def _first_file(*paths: str) -> Path:
    return next((Path(p) for p in paths if Path(p).is_file()), Path(paths[-1]))


# ----- outputs --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: Report, plot_name: str | None) -> str:
    lines = [f"# Load test{': ' + report.title if report.title else ''}", ""]
    lines += [f"Device: {report.device}  ", f"Command: `{report.command}`" if report.command else "", ""]
    lines += ["```", report.load_line(), "```", ""]
    lines += [
        f"{report.total_requests} requests, {report.total_failures} failures. Per stage: latencies of the requests "
        "that started in it (ms), req/s and output tok/s over its time; cached = prompt tokens found in the prefix cache.",
        "",
        "| users | s | requests | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | latency p50 | latency p99 "
        "| prompt tok | out tok | cached % | failures |",
        "|" + "---:|" * 15,
    ]
    for s in report.stages:
        lines.append(
            f"| {s.users} | {s.duration:.0f} | {s.requests} | {s.req_s:.2f} | {s.tok_s:.0f} "
            f"| {_ms(s.ttft_p50)} | {_ms(s.ttft_p99)} | {_ms(s.itl_p50)} | {_ms(s.itl_p99)} "
            f"| {_ms(s.latency_p50)} | {_ms(s.latency_p99)} | {_num(s.prompt_tokens_mean, 0)} "
            f"| {_num(s.completion_tokens_mean, 0)} | {_num(s.cached_pct)} | {s.failures} |"
        )
    if plot_name:
        lines += ["", f"![throughput and latency against users]({plot_name})"]
    if report.locust_stats:
        lines += [
            "",
            "## Locust's totals",
            "",
            "Whole run, locust's own (bucketed) percentiles in ms. TTFT and ITL rows are measurements of the streamed requests.",
            "",
            "| type | name | count | failures | median | p95 | p99 | max |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in report.locust_stats:
            lines.append(
                f"| {row.get('Type', '')} | {row.get('Name', '')} | {row.get('Request Count', '')} "
                f"| {row.get('Failure Count', '')} | {_fmt_locust(row.get('50%'))} | {_fmt_locust(row.get('95%'))} "
                f"| {_fmt_locust(row.get('99%'))} | {_fmt_locust(row.get('Max Response Time'))} |"
            )
    if report.failure_messages:
        lines += ["", "## Failures", "", "| method | name | error | count |", "|---|---|---|---:|"]
        for row in report.failure_messages:
            error = str(row.get("Error", "")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row.get('Method', '')} | {row.get('Name', '')} | {error} | {row.get('Occurrences', '')} |")
    return "\n".join(lines) + "\n"


def _fmt_locust(value: str | None) -> str:
    try:
        return _ms(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value or "-"


def plot(report: Report, path: Path) -> None:
    """Three panels against users (log2 axis): throughput, TTFT and request latency, ITL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    stages = report.stages
    users = [s.users for s in stages]
    fig, (ax_tp, ax_lat, ax_itl) = plt.subplots(1, 3, figsize=(16, 4.8))

    ax_tp.plot(users, [s.tok_s for s in stages], "o-", color="tab:blue", label="output tok/s")
    ax_tp.set_ylabel("output tokens / s", color="tab:blue")
    ax_rq = ax_tp.twinx()
    ax_rq.plot(users, [s.req_s for s in stages], "s--", color="tab:orange", label="req/s")
    ax_rq.set_ylabel("requests / s", color="tab:orange")
    ax_tp.set_title("Throughput")
    handles = ax_tp.get_legend_handles_labels()[0] + ax_rq.get_legend_handles_labels()[0]
    ax_tp.legend(handles, [h.get_label() for h in handles], loc="best")
    for s in stages:
        if s.failures:
            ax_tp.annotate(f"{s.failures} failed", (s.users, s.tok_s), textcoords="offset points", xytext=(0, 8),
                           ha="center", fontsize=8, color="tab:red")

    def series(ax: Any, attr: str, label: str, color: str) -> None:
        for q, style in (("p50", "o-"), ("p99", "^--")):
            pts = [(s.users, getattr(s, f"{attr}_{q}")) for s in stages if getattr(s, f"{attr}_{q}") is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{label} {q}")

    series(ax_lat, "ttft", "TTFT", "tab:green")
    series(ax_lat, "latency", "request", "tab:red")
    ax_lat.set_title("Time to first token and request latency")
    ax_lat.set_ylabel("ms")
    series(ax_itl, "itl", "ITL", "tab:purple")
    ax_itl.set_title("Inter-token latency")
    ax_itl.set_ylabel("ms per token")
    for ax in (ax_tp, ax_lat, ax_itl):
        ax.set_xlabel("concurrent users")
        if users and max(users) > 2 * min(users):
            ax.set_xscale("log", base=2)
        ax.set_xticks(users)
        ax.set_xticklabels([str(u) for u in users])
        ax.grid(True, alpha=0.3)
    for ax in (ax_tp, ax_rq):
        ax.margins(y=0.12)
        ax.set_ylim(bottom=0)
    for ax in (ax_lat, ax_itl):
        if not ax.lines:
            continue
        ys = [y for line in ax.lines for y in line.get_ydata() if y > 0]
        if ys and max(ys) > 20 * min(ys):  # spans orders of magnitude: log, with plain numbers
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.margins(y=0.12)
            ax.set_ylim(bottom=0)
        ax.legend(loc="best")
    title = report.title or "Load test"
    fig.suptitle(f"{title} ({report.device})" if report.device else title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: Report, out: Path) -> dict[str, Path]:
    """report.md, report.json and (matplotlib permitting) plot.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plot_path = out / "plot.png"
    try:
        plot(report, plot_path)
        written["plot"] = plot_path
    except ImportError:
        print("matplotlib is not installed: no plot.png (pip install matplotlib)", file=sys.stderr)
    md = out / "report.md"
    md.write_text(markdown(report, plot_path.name if "plot" in written else None), encoding="utf-8")
    written["markdown"] = md
    data = {
        "load_line": report.load_line(),
        "device": report.device,
        "command": report.command,
        "title": report.title,
        "total_requests": report.total_requests,
        "total_failures": report.total_failures,
        "stages": [{**asdict(s), "duration": s.duration} for s in report.stages],
    }
    js = out / "report.json"
    js.write_text(json.dumps(data, indent=2), encoding="utf-8")
    written["json"] = js
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Per-stage throughput and latency of a locust run (loadtest/locustfile.py).")
    p.add_argument("prefix", help="The --csv prefix the run used, e.g. runs/loadtest-X/locust.")
    p.add_argument("--out", help="Folder for report.md, report.json, plot.png (default: the prefix's folder).")
    p.add_argument("--device", default="unknown device", help="What served it, for the Load: line (e.g. '1x H100, demo-target').")
    p.add_argument("--command", default="", help="The command that ran it, for the Load: line.")
    p.add_argument("--title", default="", help="Title of the report and the plot.")
    p.add_argument("--min-stage-s", type=float, default=3.0, help="Shorter user counts are ramps, not stages.")
    p.add_argument("--warmup-s", type=float, default=0.0, help="Seconds skipped at the start of each stage.")
    a = p.parse_args(argv)
    report = build_report(a.prefix, a.device, a.command, a.title, a.min_stage_s, a.warmup_s)
    out = Path(a.out) if a.out else Path(a.prefix).parent
    written = write_report(report, out)
    print(markdown(report, None).split("\n## ")[0].rstrip())
    print()
    for kind, path in written.items():
        print(f"{kind}: {path}")
    print(report.load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
