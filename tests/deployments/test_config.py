"""serve_config.yaml args -> AppConfig -> EngineConfig / Serve options, and the error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.config import AppConfig, parse_app_config

REPO = Path(__file__).resolve().parents[2]


def shipped_args() -> dict[str, Any]:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    return app["args"]


def test_shipped_yaml_is_valid_and_maps_onto_the_engine() -> None:
    config = parse_app_config(shipped_args())
    assert Path(config.model).is_absolute() and config.model.endswith("models/demo-target")
    assert config.model_name == "demo"
    engine = config.to_engine_config()
    assert engine.max_model_len == 2048
    assert engine.cache.block_size == 16 and engine.cache.enable_prefix_caching
    assert engine.scheduler.max_num_seqs == 64
    assert engine.quantization.method == "none"
    assert engine.speculative.method == "draft" and engine.speculative.draft_model.endswith("models/demo-draft")
    llm = config.llm_server.serve_options()
    assert llm["autoscaling_config"]["target_ongoing_requests"] == 16
    assert llm["max_ongoing_requests"] == 64 and llm["max_queued_requests"] == 128
    assert llm["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert "num_replicas" not in llm
    assert (llm["graceful_shutdown_timeout_s"], llm["graceful_shutdown_wait_loop_s"]) == (20.0, 2.0)
    assert "logging_config" not in llm  # the application's own logging config applies


def test_access_log_off_is_serves_logging_config() -> None:
    args = shipped_args()
    args["llm_server"]["access_log"] = False
    config = parse_app_config(args)
    assert config.llm_server.serve_options()["logging_config"] == {"enable_access_log": False}
    assert "logging_config" not in config.ingress.serve_options()


def test_gpu_edit_of_the_yaml() -> None:
    args = shipped_args()
    args["device"] = "cuda"
    args["dtype"] = "bfloat16"
    args["quantization"] = "int8"
    args["speculative"] = {"method": "draft", "draft_model": "models/demo-draft"}
    args["llm_server"]["ray_actor_options"]["num_gpus"] = 1
    args["llm_server"]["autoscaling"]["max_replicas"] = 8
    config = parse_app_config(args)
    engine = config.to_engine_config()
    assert engine.device == "cuda" and engine.quantization.method == "int8"
    assert engine.speculative.method == "draft" and Path(engine.speculative.draft_model).is_absolute()
    assert config.llm_server.serve_options()["ray_actor_options"]["num_gpus"] == 1


def test_build_app_from_args() -> None:
    from ray.serve import Application

    from deployments.app import build_app

    assert isinstance(build_app({"model": "preset:tiny-llama"}), Application)


@pytest.mark.parametrize(
    "engine_loop, method, in_process",
    [("auto", "draft", True), ("auto", "remote", False), ("thread", "draft", False), ("process", "ngram", True)],
)
def test_where_the_engine_steps(engine_loop: str, method: str, in_process: bool) -> None:
    speculative = {"method": method, "draft_model": "models/demo-draft"} if method != "ngram" else {"method": method}
    config = AppConfig(model="models/demo-target", engine_loop=engine_loop, speculative=speculative)
    assert config.engine_in_process is in_process


def test_preset_model_name() -> None:
    assert AppConfig(model="preset:tiny-llama").model_name == "tiny-llama"


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"modle": "x"}, "modle: Extra inputs are not permitted"),
        ({"cache": {"block_size": 12}}, "block_size must be a power of two"),
        ({"dtype": "float8"}, "dtype"),
        ({"device": "cuda"}, "num_gpus >= 1"),
        ({"model": "models/no-such-model"}, "model folder 'models/no-such-model' not found"),
        ({"quantization": "int3"}, "quantization.method"),
        ({"cache": {"block_sise": 16}}, "cache.block_sise: Unexpected keyword argument"),
        ({"scheduler": {"max_num_seqs": "many"}}, "scheduler.max_num_seqs"),
        ({"speculative": {"method": "remote"}}, "draft_model"),
        ({"speculative": {"method": "draft"}}, "draft_model"),
        ({"llm_server": {"num_replicas": 2, "autoscaling": {"max_replicas": 2}}}, "either num_replicas or autoscaling"),
        ({"llm_server": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas (3) > max_replicas (2)"),
        (
            {"llm_server": {"max_ongoing_requests": 4, "autoscaling": {"target_ongoing_requests": 8}}},
            "must not exceed max_ongoing_requests",
        ),
        ({"llm_server": {"max_queued_requests": -2}}, "llm_server.max_queued_requests"),
        ({"ingress": {"graceful_shutdown_wait_loop_s": 0}}, "ingress.graceful_shutdown_wait_loop_s"),
        ({"router": {"index_timeout_s": 0}}, "router.index_timeout_s"),
        ({"max_stream_chunks_per_s": 0}, "max_stream_chunks_per_s"),
        ({"engine_loop": "fork"}, "engine_loop"),
        ({"handle_transport": "http"}, "handle_transport"),
        ({"gil_switch_interval_s": 0}, "gil_switch_interval_s"),
        ({"fused_norm_linear": "sometimes"}, "fused_norm_linear"),
        ({"decode_folds": "sometimes"}, "decode_folds"),
        ({"num_scheduler_steps": 0}, "num_scheduler_steps"),
        ({"num_scheduler_steps": 65}, "num_scheduler_steps"),
        ({"num_scheduler_steps": "4"}, "num_scheduler_steps"),
        (
            {"engine_loop": "process", "speculative": {"method": "remote", "draft_model": "models/demo-draft"}},
            "engine_loop 'process' cannot call the draft deployment",
        ),
    ],
)
def test_bad_config_names_the_field(patch: dict[str, Any], message: str) -> None:
    args = {"model": "preset:tiny-llama", **patch}
    with pytest.raises(ValueError) as err:
        parse_app_config(args)
    assert message in str(err.value)
    assert str(err.value).startswith("invalid app config")


@pytest.mark.parametrize(
    "patch",
    [{"device": "cpu"}, {"cpu_pinning": False}, {"engine_loop": "thread", "speculative": {"method": "ngram"}}],
)
def test_no_cpu_plan_where_pinning_does_not_apply(patch: dict[str, Any]) -> None:
    assert AppConfig(model="models/demo-target", **patch).cpu_plan() is None


def test_cpu_plan_on_a_gpu_setup_is_the_nodes() -> None:
    from engine.cpu_affinity import CpuPlan

    config = AppConfig(model="models/demo-target", device="cuda", llm_server={"ray_actor_options": {"num_gpus": 1}})
    # None on a host without NVIDIA GPUs (CI); the node's plan on a GPU node.
    assert config.cpu_plan() == CpuPlan.for_node()
    assert config.to_engine_config(core_cpu=3).core_cpu == 3 and config.to_engine_config().core_cpu is None
