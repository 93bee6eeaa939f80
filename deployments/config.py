"""The application's configuration: serve_config.yaml `args` -> `AppConfig` -> `EngineConfig`.

Everything a user can set lives here, validated once when the app is built,
so a typo or an impossible combination fails `serve run` with a message that
names the field instead of crashing a replica later. The groups mirror
`engine.config` (cache, scheduler, quantization, speculative); the Serve
knobs of each deployment (replicas, autoscaling, backpressure, resources)
sit in `llm_server` and `ingress`.

The engine groups are the engine's own dataclasses: pydantic validates them
field by field (unknown keys and wrong types included) and runs their checks,
so this file never drifts from what the engine accepts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.config import MAX_SCHEDULER_STEPS, CacheConfig, EngineConfig, QuantConfig, SchedulerConfig, SpeculativeConfig
from engine.cpu_affinity import CpuPlan
from engine.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# `api_key: null` (the default) takes the key from this environment variable, if it is set.
API_KEY_ENV = "RAYLLM_API_KEY"


class _Strict(BaseModel):
    # A misspelt key must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AutoscalingOptions(_Strict):
    """The usual subset of Serve's autoscaling_config (the rest keeps Serve's defaults)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        return self


class ActorOptions(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="Bytes of RAM to reserve (Ray scheduling only).")
    resources: dict[str, float] = Field(default_factory=dict)
    runtime_env: dict[str, Any] = Field(default_factory=dict)


class DeploymentOptions(_Strict):
    """Serve options of one deployment; each maps 1:1 onto `serve.deployment(...)`."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count; leave unset with autoscaling.")
    autoscaling: AutoscalingOptions | None = None
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica works on at once.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests a caller may queue for this deployment; beyond it: 503 (-1: no limit)."
    )
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, gt=0, description="How often a stopping replica checks whether its requests are done (Serve's default: 2)."
    )
    access_log: bool = Field(
        True,
        description="Serve's log line per request in each replica's log file; false: Serve's "
        "logging_config.enable_access_log off (one formatted line and file write less per request)",
    )
    # ----- placement over a cluster (cluster/README.md) ---------------------------------
    max_replicas_per_node: int | None = Field(
        None, ge=1, le=100, description="At most this many replicas on one node (1: every replica on its own node)."
    )
    placement_group_bundles: list[dict[str, float]] | None = Field(
        None, min_length=1, description="A replica's resources as several bundles, e.g. [{CPU: 2, GPU: 1}, {GPU: 1}]; the replica runs in the first."
    )
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None, description="How the bundles are placed; STRICT_PACK: all on one node (needs placement_group_bundles)."
    )

    @model_validator(mode="after")
    def _replicas(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        self._check_placement()
        if self.autoscaling is not None and self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests}) must not exceed "
                f"max_ongoing_requests ({self.max_ongoing_requests}): replicas would never reach the target"
            )
        return self

    def _check_placement(self) -> None:
        """Serve's own rules for placement groups, checked here so they name our fields."""
        bundles = self.placement_group_bundles
        if bundles is None:
            if self.placement_group_strategy is not None:
                raise ValueError("placement_group_strategy needs placement_group_bundles")
            return
        if self.max_replicas_per_node is not None:
            raise ValueError("set either max_replicas_per_node or placement_group_bundles, not both")
        for i, bundle in enumerate(bundles):
            if not bundle or any(v < 0 for v in bundle.values()) or not any(v > 0 for v in bundle.values()):
                raise ValueError(f"placement_group_bundles[{i}] must ask for some resource, e.g. {{CPU: 1, GPU: 1}}")
        # The replica actor is placed in the first bundle, so it must fit there.
        first, actor = bundles[0], self.ray_actor_options
        for resource, wanted in (("CPU", actor.num_cpus), ("GPU", actor.num_gpus), *actor.resources.items()):
            if wanted > first.get(resource, 0):
                raise ValueError(
                    f"the replica runs in placement_group_bundles[0], which has {first.get(resource, 0)} {resource}; "
                    f"ray_actor_options asks for {wanted}"
                )

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        actor = self.ray_actor_options.model_dump(exclude_none=True)
        for key in ("resources", "runtime_env"):
            if not actor[key]:
                del actor[key]
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }
        if not self.access_log:  # only then: a logging_config of ours would replace the application's own
            opts["logging_config"] = {"enable_access_log": False}
        for key in ("max_replicas_per_node", "placement_group_bundles", "placement_group_strategy"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


def _ingress_defaults() -> DeploymentOptions:
    # The ingress does little CPU work per token, so it should not take a whole core of a small machine.
    return DeploymentOptions(
        max_ongoing_requests=256, max_queued_requests=1024, ray_actor_options=ActorOptions(num_cpus=0.5)
    )


def _draft_server_defaults() -> DeploymentOptions:
    # One draft replica serves every LLM replica, one call per engine step with the whole batch.
    return DeploymentOptions(num_replicas=1, max_ongoing_requests=64, ray_actor_options=ActorOptions(num_cpus=0.5))


class RouterOptions(_Strict):
    prefix_aware: bool = Field(True, description="Route to the replica caching the longest prefix; False: power of two.")
    imbalance_threshold: int = Field(
        8, ge=0, description="A prefix hit is ignored on a replica with this many more ongoing requests than the idlest."
    )
    index_timeout_s: float = Field(0.05, gt=0, description="Longest wait for the prefix index before plain routing.")
    publish_interval_s: float = Field(0.1, gt=0, description="How often a busy replica publishes its cache to the index.")
    heartbeat_s: float = Field(5.0, gt=0, description="How often an idle replica republishes its stats.")


class DirectHTTPOptions(_Strict):
    host: str = Field("127.0.0.1", description="Address the ingress replicas listen on themselves.")
    port: int = Field(ge=1, le=65535, description="Port shared by every ingress replica of a node (SO_REUSEPORT).")


class AppConfig(_Strict):
    """The `args` of the app in serve_config.yaml."""

    # ----- model ----------------------------------------------------------------------
    model: str = Field(description="Checkpoint folder, hub id, or preset:<name> (random weights).")
    tokenizer: str | None = Field(None, description="Tokenizer folder; default: the model folder.")
    served_model_name: str | None = Field(None, description="Name clients send as `model`; default: the folder name.")
    # ----- engine (engine.config.EngineConfig) ----------------------------------------
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = Field("auto", description="auto | cpu | cuda (a GPU needs llm_server.ray_actor_options.num_gpus).")
    seed: int = 0
    max_model_len: int | None = Field(None, ge=1)
    enforce_eager: bool = False
    async_scheduling: bool | Literal["auto"] = Field(
        "auto",
        description="Launch each engine step before the last one's tokens are read back (host work overlaps the "
        "GPU's): plain decoding, and the co-located draft's speculative steps (chained on the device); "
        "auto: on for CUDA, off on the CPU.",
    )
    fused_norm_linear: bool | Literal["auto"] = Field(
        "auto",
        description="Small steps on CUDA run each RMSNorm inside the projection after it (three kernels fewer "
        "per layer, for bf16 / fp16 layers of up to 1M weights: small models). auto: in the speculative passes "
        "(draft, verify) only, where it is measured faster; true: every step of up to 64 tokens; false: never.",
    )
    decode_folds: bool = Field(
        True,
        description="Decode passes of up to 8 tokens on CUDA rotate and cache the new keys inside the attention "
        "kernel, and int4 (triton-mma) layers fold each residual add and RMSNorm into the products either side "
        "at one token: fewer kernels a step (the 8B model's int4 decode step 6% shorter on an H100). false: "
        "each in a kernel of its own.",
    )
    num_scheduler_steps: int = Field(
        1,
        ge=1,
        le=MAX_SCHEDULER_STEPS,
        strict=True,
        description="Decode steps per launch (with async scheduling, without speculation): the launch's rows "
        "decode k - 1 more passes on the device and the host reads them back at once, so its Python runs once "
        "per k tokens. Tokens then stream in groups of up to k; a request that stops early computes up to "
        "2k - 1 rows for nothing.",
    )
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    quantization: QuantConfig = Field(default_factory=QuantConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    # ----- serving --------------------------------------------------------------------
    api_key: str | None = Field(
        None,
        description=f"If set, clients must send `Authorization: Bearer <api_key>`; null: ${API_KEY_ENV} if set.",
        validate_default=True,
    )
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens when a request gives none (None: 16 for completions, the rest of the context for chat)."
    )
    stream_interval_s: float = Field(
        0.0, ge=0, description="Replicas send stream chunks at most this often (0: every engine step)."
    )
    max_stream_chunks_per_s: float = Field(
        500.0,
        gt=0,
        description=(
            "The most stream chunks one replica sends per second, over all its requests: under load each "
            "stream's chunks carry more tokens instead of costing more messages (the first token is never held)."
        ),
    )
    engine_loop: Literal["auto", "process", "thread"] = Field(
        "auto",
        description=(
            "Where a replica's engine steps: 'process' (a child process, so the replica's event loop never "
            "slows a step), 'thread' (a worker thread of the replica), 'auto' (process, except with "
            "speculative.method 'remote', whose proposer calls the draft deployment from the replica)."
        ),
    )
    gil_switch_interval_s: float | None = Field(
        None,
        gt=0,
        le=0.1,
        description=(
            "Python's thread switch interval (sys.setswitchinterval) in the ingress and LLM replicas. Each "
            "replica has several threads that take the GIL by turns (its event loop, gRPC's poller, the "
            "engine core client's reader); a thread that wants the GIL waits up to this long for a busy one "
            "to let go. null: Python's own 5 ms."
        ),
    )
    cpu_pinning: bool = Field(
        True,
        description=(
            "On a GPU node with the engine in its own process: each engine core on a CPU of its own (the "
            "node's highest-numbered CPUs, one per GPU, its SMT sibling left idle) and the ingress and LLM "
            "replicas kept off those CPUs, so their wake-ups never preempt or share a step's core "
            "(engine/cpu_affinity.py). Ignored on the CPU, with "
            "engine_loop 'thread', and on nodes with fewer than 4 CPUs per GPU."
        ),
    )
    handle_transport: Literal["grpc", "ray"] = Field(
        "grpc",
        description=(
            "How the ingress calls the LLM replicas and reads their streams: 'grpc' (Ray Serve's "
            "gRPC transport, by value: less CPU per request and per chunk under streaming load) or 'ray' "
            "(Ray's own actor calls and object store). The HTTP proxy's hop to the ingress follows the "
            "environment variable RAY_SERVE_PROXY_USE_GRPC=1, which `make serve` sets."
        ),
    )
    ingress_direct_http: DirectHTTPOptions | None = Field(
        None,
        description=(
            "Each ingress replica also serves the OpenAI API itself on this host:port, beside Serve's HTTP "
            "proxy: the replicas of a node share the port (SO_REUSEPORT), so HTTP capacity grows with "
            "ingress.num_replicas instead of stopping at the one proxy process per node. null: proxy only."
        ),
    )
    router: RouterOptions = Field(default_factory=RouterOptions)
    llm_server: DeploymentOptions = Field(default_factory=DeploymentOptions)
    ingress: DeploymentOptions = Field(default_factory=_ingress_defaults)
    draft_server: DeploymentOptions = Field(
        default_factory=_draft_server_defaults, description="The draft deployment (speculative.method: remote)."
    )

    @field_validator("quantization", mode="before")
    @classmethod
    def _quantization_shorthand(cls, v: Any) -> Any:
        # `quantization: int8` reads better in yaml than a one-key mapping.
        return {"method": v} if isinstance(v, str) else v

    @field_validator("api_key")
    @classmethod
    def _api_key_from_env(cls, v: str | None) -> str | None:
        # Read where the app is built (serve run / serve deploy's build task), so a key kept in
        # the environment (a Kubernetes Secret) never has to be written into the yaml.
        if v is None:
            v = os.environ.get(API_KEY_ENV) or None
        if v is not None and not v.strip():
            raise ValueError("api_key must not be blank (null turns authentication off)")
        return v

    @field_validator("model", "tokenizer")
    @classmethod
    def _resolve_path(cls, v: str | None) -> str | None:
        return resolve_model_path(v) if v is not None else None

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        if self.speculative.method == "remote" and not self.speculative.draft_model:
            raise ValueError("speculative.method 'remote' needs speculative.draft_model (the draft deployment's model)")
        if self.speculative.method == "remote" and self.engine_loop == "process":
            raise ValueError("engine_loop 'process' cannot call the draft deployment: use 'auto' or 'thread' with speculative.method 'remote'")
        if self.speculative.draft_model is not None:
            self.speculative.draft_model = resolve_model_path(self.speculative.draft_model)
        wants_gpu = self.device.startswith("cuda")
        if wants_gpu and self.llm_server.ray_actor_options.num_gpus <= 0:
            raise ValueError(f"device {self.device!r} needs llm_server.ray_actor_options.num_gpus >= 1")
        if wants_gpu and self.speculative.method == "remote" and self.draft_server.ray_actor_options.num_gpus <= 0:
            raise ValueError(f"device {self.device!r} needs draft_server.ray_actor_options.num_gpus > 0 (e.g. 0.25)")
        try:
            self.to_engine_config()
        except ConfigError as exc:  # the engine's own checks, with its own field names
            raise ValueError(str(exc)) from None
        return self

    @property
    def engine_in_process(self) -> bool:
        """True: the replica runs its engine in a child process (see engine/core_process.py)."""
        return self.engine_loop == "process" or (self.engine_loop == "auto" and self.speculative.method != "remote")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith("preset:"):
            return self.model.removeprefix("preset:")
        return Path(self.model).name or self.model

    def cpu_plan(self) -> CpuPlan | None:
        """This node's CPU plan when cpu_pinning applies here; call it before pinning anything."""
        if not self.cpu_pinning or not self.engine_in_process or self.device == "cpu":
            return None
        return CpuPlan.for_node()

    def to_engine_config(self, core_cpu: int | None = None) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            device=self.device,
            seed=self.seed,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            fused_norm_linear=self.fused_norm_linear,
            decode_folds=self.decode_folds,
            num_scheduler_steps=self.num_scheduler_steps,
            core_cpu=core_cpu,
            # Copies: the engine may adjust its config; the app's stays as validated.
            cache=dataclasses.replace(self.cache),
            scheduler=dataclasses.replace(self.scheduler),
            quantization=dataclasses.replace(self.quantization),
            speculative=dataclasses.replace(self.speculative),
        )


def resolve_model_path(value: str) -> str:
    """An existing local folder becomes an absolute path (replicas may run in another cwd).

    Relative paths are tried against the cwd, then the project root, so the
    bundled `models/...` work from anywhere. Anything else is left alone: a
    hub id or a preset, which the engine resolves.
    """
    if value.startswith("preset:"):
        return value
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve())
    if value.startswith(("/", "./", "../", "~")) or value.startswith("models/"):
        raise ValueError(f"model folder {value!r} not found (looked in {', '.join(str(c) for c in candidates)})")
    return value


def parse_app_config(args: dict[str, Any]) -> AppConfig:
    """`AppConfig` from yaml args, or a ValueError that lists every bad field in one message."""
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "args"
            lines.append(f"  {where}: {str(err['msg']).removeprefix('Value error, ')}")
        raise ValueError("invalid app config (serve_config.yaml args):\n" + "\n".join(lines)) from None
