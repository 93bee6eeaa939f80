"""The cluster files parse and validate: launcher yaml (Ray's own schema), RayService, the cluster serve config.

Nothing is launched: the launcher config goes through the autoscaler's
prepare/validate, the serve configs through Serve's ServeDeploySchema and
our AppConfig (and build_app), and the RayService is checked against the
cluster serve config it embeds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.config import parse_app_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text(encoding="utf-8"))


def ray_pin() -> str:
    (version,) = re.findall(r'"ray\[serve\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    return version


def serve_deploy_schema(config: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(config)


# ----- cluster/serve_config.cluster.yaml ---------------------------------------------------------


def test_cluster_serve_config_is_valid_for_serve_and_the_app() -> None:
    config = load("serve_config.cluster.yaml")
    schema = serve_deploy_schema(config)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app" and app.route_prefix == "/"
    args = parse_app_config(config["applications"][0]["args"])
    assert args.device == "cuda" and args.dtype == "bfloat16"
    llm = args.llm_server.serve_options()
    assert llm["ray_actor_options"]["num_gpus"] == 1  # one GPU per replica
    assert llm["autoscaling_config"]["max_replicas"] == 8
    assert args.api_key is None or args.api_key  # null: from $RAYLLM_API_KEY where the app is built


def test_cluster_serve_config_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve import Application

    from deployments.app import build_app

    monkeypatch.setenv("RAYLLM_API_KEY", "sk-from-the-secret")
    args = load("serve_config.cluster.yaml")["applications"][0]["args"]
    assert parse_app_config(args).api_key == "sk-from-the-secret"
    assert isinstance(build_app(args), Application)


def test_cluster_serve_config_keeps_serve_config_yaml_keys() -> None:
    """The cluster file is serve_config.yaml's app with other values, not another set of keys."""
    shipped = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    cluster = load("serve_config.cluster.yaml")["applications"][0]["args"]

    def keys(d: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, f"{prefix}{k}.")
        return out

    extra = keys(cluster) - keys(shipped)
    # Placement keys are cluster-only; autoscaling -> num_replicas changes are allowed either way.
    assert extra <= {"llm_server.health_check_period_s", "llm_server.health_check_timeout_s",
                     "llm_server.graceful_shutdown_timeout_s", "ingress.num_replicas"}, extra


# ----- cluster/ray-cluster.yaml -------------------------------------------------------------------


def test_launcher_yaml_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("ray-cluster.yaml")
    validate_config(prepare_config(config))  # raises on any key Ray does not know or a wrong type
    nodes = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(nodes) == {"head", "gpu_worker"}
    assert nodes["gpu_worker"]["max_workers"] <= config["max_workers"]


def test_launcher_installs_the_project_and_deploys_the_cluster_config() -> None:
    config = load("ray-cluster.yaml")
    setup = "\n".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "cu130" in setup and "pip install -q -e ." in setup
    assert config["file_mounts"] == {"~/rayllm": "."}
    head = "\n".join(config["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--num-gpus=0" in head  # GPU replicas only on the workers
    assert "serve deploy cluster/serve_config.cluster.yaml" in head
    assert (CLUSTER / "serve_config.cluster.yaml").is_file()
    worker = "\n".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for commands in (head, worker):
        assert "RAYLLM_API_KEY" in commands


# ----- cluster/rayservice.yaml --------------------------------------------------------------------


def test_rayservice_embeds_the_cluster_serve_config() -> None:
    service = load("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == load("serve_config.cluster.yaml")
    serve_deploy_schema(embedded)
    parse_app_config(embedded["applications"][0]["args"])


def test_rayservice_cluster_has_gpu_workers_for_the_replicas() -> None:
    spec = load("rayservice.yaml")["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_pin()
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    args = parse_app_config(yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"])
    per_replica = args.llm_server.ray_actor_options.num_gpus
    assert gpus_per_pod >= per_replica
    assert group["maxReplicas"] * gpus_per_pod // per_replica >= args.llm_server.autoscaling.max_replicas
    assert group["minReplicas"] * gpus_per_pod // per_replica >= args.llm_server.autoscaling.min_replicas
    images = {c["image"] for c in [*head["template"]["spec"]["containers"], container]}
    assert len(images) == 1
    for c in [*head["template"]["spec"]["containers"], container]:
        (env,) = [e for e in c["env"] if e["name"] == "RAYLLM_API_KEY"]
        assert env["valueFrom"]["secretKeyRef"]["optional"] is True


def test_dockerfile_uses_the_pinned_ray() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM rayproject/ray:([0-9.]+)-", dockerfile, flags=re.M)
    assert base == ray_pin()
    assert ".venv" in (CLUSTER / "Dockerfile.dockerignore").read_text().split()
