"""The benchmark scripts run end to end at tiny sizes on the CPU (their figures are measured on the GPU)."""

from __future__ import annotations

import math

import pytest

from bench import scale, throughput


def test_throughput_runs_ours_and_the_padded_peer():
    results = throughput.main(
        ["--preset", "tiny-qwen3", "--num-requests", "3", "--min-len", "5", "--max-len", "20",
         "--output-len", "3", "--peers", "padded", "--variants", "graphs,eager,graphs-async", "--profile"]
    )
    for key in ("ours_graphs", "ours_eager", "ours_graphs-async", "hf_padded_generate"):
        assert results[key]["tokens"] == 9  # 3 requests x 3 tokens, EOS ignored
    assert results["ours_graphs"]["first_tokens"] == results["ours_eager"]["first_tokens"]
    assert results["ours_graphs-async"]["first_tokens"] == results["ours_graphs"]["first_tokens"]
    assert results["ours_graphs-async"]["profile"]["batch"] == 3
    assert results["ceiling"]["floor_seconds"] > 0
    assert results["ours_graphs"]["profile"]["batch"] == 3
    assert 0.0 <= results["ours_graphs"]["profile"]["kv_waste_fraction"] < 1.0
    assert results["ours_graphs"]["profile"]["graph_replay_ms_per_step"] is None  # CUDA graphs only


def test_scale_runs_every_config_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = scale.main(["--preset", "tiny-qwen3", "--configs", "2:5-20,4:30-40", "--output-len", "3", "--out", str(tmp_path)])
    assert [r["requests"] for r in rows] == [2, 4]
    assert all(r["tok_s"] > 0 and math.isfinite(r["ceiling_fraction"]) for r in rows)
    assert (tmp_path / "scale.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_serve_throughput_interleaves_direct_and_serve_per_level(tmp_path):
    """W2 at toy size, as its report command runs it (--interleave --rounds 2): per level direct, Serve,
    direct, Serve, direct, each pass on prompts neither engine has cached, over one engine and one Serve
    app kept up (one ingress replica: each replica start is seconds of CPU on CI; a Ray setting through
    the environment); each path's figure is the mean of its passes. One run for every check: each start
    of Ray and of the app costs CI a quarter of a minute."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "w2.json"
    sets = "ingress.num_replicas=1,max_stream_chunks_per_s=1,env.RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=100"
    cmd = [
        sys.executable, "bench/serve_throughput.py", "--concurrency", "2", "--requests-per-level", "4",
        "--output-len", "6", "--prompt-len", "16", "--num-kv-blocks", "256", "--no-compile-pass",
        "--interleave", "--rounds", "2", "--serve-set", sets, "--client-procs", "2", "--json", str(out),
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert [v["sets"] for v in results["serve_variants"]] == [sets]
    for levels in (results["direct"], results["serve"]):
        assert [(lv["concurrency"], lv["requests"], lv["errors"], lv["output_tokens"]) for lv in levels] == [(2, 4, 0, 24)]
    (direct,), (serve,) = results["direct"], results["serve"]
    assert len(direct["tok_s_runs"]) == 3 and direct["tok_s"] == sum(direct["tok_s_runs"]) / 3
    assert len(serve["tok_s_runs"]) == 2 and serve["tok_s"] == sum(serve["tok_s_runs"]) / 2
    # the progress shows the order
    order = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ") and " c=" in line]
    assert order[:5] == ["direct", "serve", "direct", "serve", "direct"]
    assert "each Serve pass against the direct ones around it: " in done.stdout
    assert "W2: " in done.stdout and "Serve variant: ingress.num_replicas=1,max_stream_chunks_per_s=1" in done.stdout
    # The level also read how long requests waited once on a replica: all 4 got a first token.
    assert serve["replica_first_tokens"] == 4 and 0 < serve["replica_ttft_mean_ms"] <= serve["ttft_mean_ms"]
    # ... and where the clients' TTFT went, from the Server-Timing headers.
    assert 0 < serve["server_ingress_mean_ms"] <= serve["server_handler_mean_ms"] <= serve["ttft_mean_ms"]
    # ... and each stream's way out, from the comment before [DONE] (one host's clocks, 1 ms rounding).
    assert all(serve[f"server_{name}_mean_ms"] >= -1.0 for name in ("out_replica", "out_ingress", "out_client"))
    assert "a stream's way out" in done.stdout


def test_serve_variant_args_split_app_args_and_ray_environment():
    from bench.serve_throughput import variant_args

    base = {"ingress": {"num_replicas": 2}, "model": "m"}
    args, env = variant_args(base, "ingress.num_replicas=4,env.RAY_SERVE_THROUGHPUT_OPTIMIZED=1,max_stream_chunks_per_s=500")
    assert args == {"ingress": {"num_replicas": 4}, "model": "m", "max_stream_chunks_per_s": 500}
    assert env == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} and base["ingress"]["num_replicas"] == 2
    with pytest.raises(SystemExit, match="env.NAME=value"):
        variant_args(base, "ingress.num_replicas")


def test_serve_counters_are_summed_over_replicas():
    from bench.serve_throughput import parse_counters, replica_wait

    def page(ingress: str, lag_s: float, checks: float) -> str:
        return "\n".join([
            "# HELP llm_replica_first_tokens_total Requests that got their first token on the replica",
            'llm_replica_first_tokens_total{replica="a"} 3.0',
            'llm_replica_first_tokens_total{replica="b"} 5.0',
            'llm_replica_first_token_wait_seconds_total{replica="a"} 0.25',
            'llm_replica_first_token_wait_seconds_total{replica="b"} 0.75',
            'llm_replica_free_kv_blocks{replica="a"} 9.0',
            'llm_replica_event_loop_lag_seconds_total{replica="a"} 0.5',
            'llm_replica_event_loop_lag_checks_total{replica="a"} 100.0',
            f'llm_ingress_event_loop_lag_seconds_total{{replica="{ingress}"}} {lag_s}',
            f'llm_ingress_event_loop_lag_checks_total{{replica="{ingress}"}} {checks}',
            'llm_replica_gc_pause_seconds_total{replica="a"} 0.125',
            'llm_replica_gc_pause_seconds_total{replica="b"} 0.125',
            'llm_replica_gc_full_pause_seconds_total{replica="a"} 0.0',
            'llm_replica_gc_full_collections_total{replica="a"} 1.0',
            f'llm_ingress_gc_pause_seconds_total{{replica="{ingress}"}} {lag_s}',
            f'llm_ingress_gc_full_collections_total{{replica="{ingress}"}} {checks}',
            'llm_replica_engine_steps_total{replica="a"} 40.0',
            'llm_replica_engine_prompt_steps_total{replica="a"} 2.0',
            'llm_replica_engine_step_seqs_total{replica="a"} 120.0',
        ])

    after = parse_counters(page("i1", 0.02, 10.0))
    assert after["llm_replica_first_token_wait_seconds_total"] == 1.0 and after["llm_replica_first_tokens_total"] == 8.0
    before = parse_counters(page("i1", 0.01, 5.0)) | {
        "llm_replica_first_token_wait_seconds_total": 0.5, "llm_replica_first_tokens_total": 4.0,
        "llm_replica_event_loop_lag_seconds_total": 0.0, "llm_replica_event_loop_lag_checks_total": 50.0,
    }
    before["llm_replica_gc_pause_seconds_total"] = 0.0
    assert replica_wait(before, after) == {
        "replica_first_tokens": 4.0, "replica_ttft_mean_ms": 125.0,
        "replica_loop_lag_mean_ms": 10.0, "ingress_loop_lag_mean_ms": 2.0,
        "replica_gc_pause_ms": 250.0, "replica_gc_full_pause_ms": 0.0, "replica_gc_full_collections": 0.0,
        "ingress_gc_pause_ms": pytest.approx(10.0), "ingress_gc_full_collections": 5.0,
    }
    # Another ingress replica answered the second scrape: its counters say nothing about the level.
    other = replica_wait(parse_counters(page("i2", 0.5, 900.0)), after)
    assert math.isnan(other["ingress_loop_lag_mean_ms"])


def test_step_figures_per_request_and_per_step():
    from bench.serve_throughput import step_figures

    before = {"steps_total": 10, "prompt_steps_total": 1, "step_seqs_total": 30}
    after = {"steps_total": 50, "prompt_steps_total": 5, "step_seqs_total": 630}
    assert step_figures(before, after, requests=20) == {
        "engine_steps_per_request": 2.0, "engine_prompt_steps_per_request": 0.2, "engine_seqs_per_step": 15.0,
    }
    assert step_figures({}, after, requests=20) == {}  # no reading before: nothing to say
    assert step_figures(before, before, requests=20) == {}  # no step between


def test_mixed_step_times_the_pieces_and_the_eager_pass_on_the_same_step():
    from bench import mixed_step

    result = mixed_step.main(["--device", "cpu", "--decodes", "2", "--prompt-len", "16", "--calls", "1", "--repeats", "1"])
    assert result["tokens"] == 2 + 16
    assert result["relative_error"] < 1e-5  # fp32, the same pieces eagerly: the same sums
    assert result["mixed_graphs_ms"] > 0 and result["eager_ms"] > 0 and result["decode_graph_ms"] > 0


def test_spec_chain_check_compares_chained_and_synchronous_steps(capsys):
    from bench import spec_chain_check

    assert spec_chain_check.main(["--batch-sizes", "2", "--output-len", "12", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(spec_chain_check.CASES)
    assert all("2/2 sequences equal to synchronous steps" in line and "MISMATCH" not in line for line in lines)
