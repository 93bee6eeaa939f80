"""`build_app`: the import path serve_config.yaml names (`deployments.app:build_app`).

    serve run serve_config.yaml                       # args from the yaml
    serve.run(build_app({"model": "preset:tiny-llama"}))  # or from Python

The yaml's args are validated into an `AppConfig` here, in the process that
builds the app, so a bad config fails the deploy with a readable message
before any replica starts.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import DeploymentActorConfig, RequestRouterConfig

from deployments.config import AppConfig, parse_app_config
from deployments.ingress import OpenAIIngress
from deployments.llm_server import PREFIX_INDEX_ACTOR, LLMServer
from deployments.prefix_index import PrefixIndex
from deployments.router import PrefixAwareRouter


def build_app(args: dict[str, Any]) -> Application:
    config = parse_app_config(args)
    return build_app_from_config(config)


def build_app_from_config(config: AppConfig) -> Application:
    llm_options = config.llm_server.serve_options()
    router = config.router
    index = DeploymentActorConfig(
        name=PREFIX_INDEX_ACTOR,
        actor_class=PrefixIndex,
        # A replica silent for this long is presumed dead and dropped from the index.
        init_kwargs={"stale_after_s": 6 * router.heartbeat_s},
        actor_options={"num_cpus": 0},
    )
    llm_options["deployment_actors"] = [index]
    if router.prefix_aware:
        llm_options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAwareRouter,
            request_router_kwargs={
                "block_size": config.cache.block_size,
                "imbalance_threshold": router.imbalance_threshold,
                "index_timeout_s": router.index_timeout_s,
            },
        )
    draft = None
    if config.speculative.method == "remote":
        from deployments.draft_server import DraftServer, draft_server_kwargs

        draft = DraftServer.options(**config.draft_server.serve_options()).bind(**draft_server_kwargs(config))
    llm = LLMServer.options(**llm_options).bind(config, draft)
    return OpenAIIngress.options(**config.ingress.serve_options()).bind(llm, config)
