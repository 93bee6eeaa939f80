"""The load test's parts without a server: stream parsing, prompts, stages, the report on synthetic CSVs.

Nothing here may import locust (it monkey-patches the process with gevent):
the last test checks that.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

from loadtest import report, run, serve_local
from loadtest.prompts import PromptSource, parse_mix, parse_range, shared_preamble
from loadtest.records import COLUMNS, RequestLog, RequestRecord, StreamReader, log_path, read_records, usage_counts
from loadtest.stages import StepPlan, parse_steps

REPO = Path(__file__).resolve().parents[2]


# ----- streamed answers -----------------------------------------------------------------------


def _chat_chunk(content: str | None, role: str | None = None, finish: str | None = None) -> str:
    delta = {"role": role, "content": content}
    return json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_stream_reader_chat_with_usage() -> None:
    r = StreamReader(sent_at=10.0)
    r.feed_line(f"data: {_chat_chunk('', role='assistant')}", 10.05)  # the role chunk is not a token
    r.feed_line("", 10.06)
    r.feed_line(f"data: {_chat_chunk('def')}".encode(), 10.2)
    r.feed_line(f"data: {_chat_chunk(' f')}", 10.3)
    r.feed_line(f"data: {_chat_chunk('(x):')}", 10.6)
    r.feed_line(f"data: {_chat_chunk(None, finish='length')}", 10.61)
    usage = {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24, "prompt_tokens_details": {"cached_tokens": 16}}
    r.feed_line("data: " + json.dumps({"choices": [], "usage": usage}), 10.62)
    r.feed_line("data: [DONE]", 10.63)
    assert r.failure() is None
    assert r.ttft_ms == pytest.approx(200.0)
    assert r.completion_tokens == 4  # from usage, not the 3 text chunks
    assert r.itl_ms == pytest.approx(400.0 / 3)
    assert usage_counts(r.usage) == (20, 16, 4)


def test_stream_reader_completions_without_usage_counts_chunks() -> None:
    r = StreamReader(sent_at=0.0)
    for i, text in enumerate(["a", "b", "", "c"]):
        r.feed("{\"choices\": [{\"index\": 0, \"text\": \"%s\"}]}" % text, 1.0 + i)
    r.feed("[DONE]", 5.0)
    assert r.completion_tokens == 3
    assert r.ttft_ms == pytest.approx(1000.0)
    assert r.itl_ms == pytest.approx(1500.0)  # first text at 1 s, last at 4 s: 3 s over 2 gaps


def test_stream_reader_failures() -> None:
    broken = StreamReader(0.0)
    broken.feed(json.dumps({"choices": [{"index": 0, "text": "x"}]}), 1.0)
    assert broken.failure() == "stream ended without [DONE]"
    in_band = StreamReader(0.0)
    in_band.feed(json.dumps({"error": {"message": "the model replica is unavailable", "type": "x"}}), 1.0)
    in_band.feed("[DONE]", 1.0)
    assert in_band.failure() == "the model replica is unavailable"
    assert StreamReader(0.0).itl_ms is None and StreamReader(0.0).ttft_ms is None


def test_request_log_round_trip(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "x_requests.csv")
    rec = RequestRecord(
        start=100.5, end=101.5, endpoint="chat", stream=True, prompt_kind="shared", ok=True, latency_ms=1000.0,
        ttft_ms=120.0, itl_ms=20.0, first_token=100.62, prompt_tokens=500, cached_tokens=480, completion_tokens=44, users=8,
    )
    log.write(rec)
    log.write(RequestRecord(start=102.0, end=102.1, endpoint="completions", stream=False, prompt_kind="short", ok=False, latency_ms=100.0, error="HTTP 503: overloaded"))
    log.close()
    with open(tmp_path / "x_requests.csv") as f:
        assert next(csv.reader(f)) == COLUMNS
    back = read_records([tmp_path / "x_requests.csv"])
    assert back[0] == rec
    assert back[1].ok is False and back[1].ttft_ms is None and back[1].error == "HTTP 503: overloaded"
    assert log_path("out/locust_requests.csv", worker=False) == Path("out/locust_requests.csv")
    assert re.fullmatch(r"locust_requests\.\d+\.csv", log_path("out/locust_requests.csv", worker=True).name)


# ----- prompts and options ----------------------------------------------------------------------


def test_prompt_kinds() -> None:
    src = PromptSource(parse_mix("mixed"), long_tokens=400, shared_tokens=300, seed=7)
    a, b = src.make("shared", chat=True), src.make("shared", chat=True)
    assert a.messages[0] == b.messages[0] == {"role": "system", "content": shared_preamble(300)}  # the cached prefix
    assert a.messages[1] != b.messages[1]
    c, d = src.make("shared", chat=False), src.make("shared", chat=False)
    assert c.text.startswith(shared_preamble(300)) and d.text.startswith(shared_preamble(300)) and c.text != d.text
    long1, long2 = src.make("long", chat=False), src.make("long", chat=False)
    assert long1.text.split("\n")[0] != long2.text.split("\n")[0]  # unique first line: no shared prefix
    assert 350 * 3.5 < len(long1.text) < 450 * 3.5
    assert src.make("short", chat=True).messages[0]["role"] == "user"
    assert PromptSource({"long": 1.0}, seed=1).draw(chat=False).kind == "long"
    with pytest.raises(ValueError):
        src.make("huge", chat=False)


def test_parse_options() -> None:
    assert parse_mix("short=2,long=0,shared=1") == {"short": 2.0, "long": 0.0, "shared": 1.0}
    assert parse_mix("shared") == {"shared": 1.0}
    for bad in ("tiny=1", "short=1,long", "short=-1", "short=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    assert parse_range("0", "x") == (0.0, 0.0)
    assert parse_range("1,3", "x") == (1.0, 3.0)
    for bad in ("3,1", "-1", "a", "1,2,3"):
        with pytest.raises(ValueError):
            parse_range(bad, "x")
    assert parse_steps("1, 4,16") == (1, 4, 16)
    for bad in ("", "0,4", "a"):
        with pytest.raises(ValueError):
            parse_steps(bad)


def test_step_plan() -> None:
    plan = StepPlan((1, 4, 16), step_time=10, ramp=2)
    assert plan.duration == 30
    assert plan.tick(0) == (1, 0.5)
    assert plan.tick(9.9) == (1, 0.5)
    assert plan.tick(10) == (4, 1.5)  # 3 more users over 2 s
    assert plan.tick(25) == (16, 6.0)
    assert plan.tick(30) is None
    with pytest.raises(ValueError):
        StepPlan((1,), step_time=0)


def test_serve_local_args_from_the_shipped_config() -> None:
    args = serve_local.app_args(None, ["device=cuda", "llm_server.ray_actor_options.num_gpus=1", "scheduler.max_num_seqs=256"])
    assert args["model"] == "models/demo-target"
    assert args["device"] == "cuda"
    assert args["llm_server"]["ray_actor_options"]["num_gpus"] == 1
    assert args["scheduler"]["max_num_seqs"] == 256
    assert args["scheduler"]["enable_chunked_prefill"] is True  # the rest of the mapping kept
    with pytest.raises(ValueError):
        serve_local.app_args(None, ["device"])


def test_run_builds_the_locust_command(tmp_path: Path) -> None:
    a = run.parser().parse_args(["--host", "http://h:1", "--steps", "1,8", "--step-time", "20", "--", "--prompt-mix", "long"])
    cmd, env, expected = run.locust_command(a, tmp_path, "demo")
    assert env["LOAD_SHAPE"] == "steps" and expected == 40
    assert cmd[cmd.index("--steps") + 1] == "1,8" and cmd[-2:] == ["--prompt-mix", "long"]
    assert cmd[cmd.index("--csv") + 1] == str(tmp_path / "locust")
    assert "-u" not in cmd and "--processes" not in cmd
    a = run.parser().parse_args(["--users", "32", "--run-time", "1m30s", "--processes", "4"])
    cmd, env, expected = run.locust_command(a, tmp_path, "demo")
    assert "LOAD_SHAPE" not in env and expected == 90
    assert cmd[cmd.index("-u") + 1] == "32" and cmd[cmd.index("--processes") + 1] == "4"


# ----- the report on a synthetic run ----------------------------------------------------------


def _write_synthetic_run(prefix: Path) -> None:
    """A run of 1 user for 10 s, then 4 users for 10 s (t0 = 1000), with a 2-user ramp sample between."""
    t0 = 1000.0
    header = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", "50%", "Total Request Count"]
    users_at = [0] + [1] * 10 + [2] + [4] * 9 + [0]
    with open(f"{prefix}_stats_history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, users in enumerate(users_at):
            w.writerow([int(t0 + i), users, "", "Aggregated", 0, 0, "N/A", 0])
            w.writerow([int(t0 + i), users, "POST", "/v1/completions", 0, 0, "N/A", 0])  # not Aggregated: ignored
    log = RequestLog(f"{prefix}_requests.csv")
    # Stage 1 (users 1, [1000, 1010)): 5 streamed requests of 1.5 s, 20 tokens, TTFT 100..500 ms.
    for i in range(5):
        s = t0 + 0.2 + 1.9 * i
        log.write(RequestRecord(s, s + 1.5, "chat", True, "shared", True, 1500.0, ttft_ms=100.0 * (i + 1), itl_ms=10.0,
                                first_token=s + 0.1 * (i + 1), prompt_tokens=100, cached_tokens=50, completion_tokens=20, users=1))
    # Stage 2 (users 4, [1012, 1021)): 8 non-streamed requests of 1 s, 10 tokens each, one failure.
    for i in range(8):
        s = t0 + 12 + i
        log.write(RequestRecord(s, s + 1, "completions", False, "short", True, 1000.0, prompt_tokens=10, completion_tokens=10, users=4))
    log.write(RequestRecord(t0 + 13, t0 + 13.1, "completions", False, "short", False, 100.0, error="HTTP 503: overloaded", users=4))
    log.close()
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
                    "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s", "50%", "95%", "99%"])
        w.writerow(["POST", "/v1/completions", 9, 1, 1000, 900, 100, 1000, 0, 1, 0.1, 1000, 1000, 1000])
        w.writerow(["", "Aggregated", 15, 1, 1000, 900, 100, 2000, 0, 1, 0.1, 1000, 2000, 2000])
    with open(f"{prefix}_failures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Method", "Name", "Error", "Occurrences"])
        w.writerow(["POST", "/v1/completions", "HTTP 503: overloaded", 1])


def test_percentile() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([5.0], 99) == 5.0
    assert report.percentile([1, 2, 3, 4], 50) == 2.5
    assert report.percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert report.percentile([10, 0, 20], 100) == 20


def test_report_on_a_synthetic_run(tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    _write_synthetic_run(prefix)
    r = report.build_report(prefix, device="test box", command="make loadtest")
    assert [s.users for s in r.stages] == [1, 4]  # the 2-user ramp sample is not a stage
    one, four = r.stages
    assert (one.start, one.end) == (1000.0, 1010.0)  # from the last idle sample to its own last sample
    assert (four.start, four.end) == (1012.0, 1021.0)  # to the idle sample: stopping starts nothing new
    assert one.requests == 5 and one.failures == 0
    assert one.ttft_p50 == pytest.approx(300.0) and one.ttft_p99 == pytest.approx(496.0)
    assert one.itl_p50 == 10.0 and one.latency_p50 == 1500.0
    assert one.tok_s == pytest.approx(5 * 20 / 10)  # every token of stage 1 fell inside it
    assert one.req_s == pytest.approx(5 / 10)
    assert one.cached_pct == pytest.approx(50.0)
    assert four.requests == 9 and four.failures == 1
    assert four.ttft_p50 is None  # nothing streamed
    assert four.req_s == pytest.approx(8 / 9)  # the last request ends at 1020 < 1021
    assert four.tok_s == pytest.approx(80 / 9)
    assert r.total_requests == 14 and r.total_failures == 1
    line = r.load_line()
    assert line == "Load: 4 users, 0.9 req/s, 9 tok/s, TTFT p50/p99 -/- ms, failures 1 (test box, make loadtest)"

    written = report.write_report(r, tmp_path / "out")
    md = written["markdown"].read_text()
    assert "| 1 | 10 | 5 | 0.50 | 10 | 300 | 496 |" in md
    assert "HTTP 503: overloaded" in md and line in md
    data = json.loads(written["json"].read_text())
    assert [s["users"] for s in data["stages"]] == [1, 4] and data["load_line"] == line
    pytest.importorskip("matplotlib")
    png = written["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "![throughput and latency against users](plot.png)" in md


def test_report_cli_and_a_request_spanning_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "run"
    with open(f"{prefix}_stats_history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Timestamp", "User Count", "Type", "Name"])
        for i, users in enumerate([0, 2, 2, 2, 2, 8, 8, 8, 8]):
            w.writerow([100 + i, users, "", "Aggregated"])
    log = RequestLog(f"{prefix}_requests.csv")
    # First token at 103, last byte at 107: 40 tokens over 4 s; 2 users [100, 104), ramp, 8 users [105, 109).
    log.write(RequestRecord(101.0, 107.0, "chat", True, "long", True, 6000.0, ttft_ms=2000.0, itl_ms=100.0,
                            first_token=103.0, prompt_tokens=1000, completion_tokens=40, users=2))
    log.close()
    assert report.main([str(prefix), "--device", "cpu", "--command", "x", "--min-stage-s", "2"]) == 0
    two, eight = report.build_report(prefix, min_stage_s=2).stages
    assert (two.start, two.end, eight.start, eight.end) == (100, 104, 105, 109)
    assert two.tok_s == pytest.approx(10 / 4) and eight.tok_s == pytest.approx(20 / 4)  # the ramp second counts nowhere
    assert two.requests == 1 and eight.requests == 0 and two.req_s == 0 and eight.req_s == pytest.approx(1 / 4)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("Load: 8 users, 0.2 req/s, 5 tok/s")
    assert (tmp_path / "report.md").is_file()


def test_report_without_a_request_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no request log"):
        report.build_report(tmp_path / "nothing")


def test_no_locust_import() -> None:
    assert "locust" not in sys.modules and "gevent" not in sys.modules
