"""The Ray Serve layer: an OpenAI-compatible API over our engine. Nothing here computes tokens.

    app.py           build_app(args): serve_config.yaml's import path
    config.py        AppConfig: the yaml's args, validated; -> EngineConfig and Serve options
    ingress.py       OpenAIIngress: FastAPI routes, SSE, error bodies, /metrics
    serving.py       OpenAI request -> token ids + SamplingParams; outputs -> OpenAI bodies
    protocol.py      the OpenAI request/response models
    llm_server.py    LLMServer: one engine per replica (its core in a child process); publishes its cache to the index
    prefix_index.py  PrefixIndex: which replica caches which KV block hashes (+ replica stats)
    router.py        PrefixAwareRouter: longest cached prefix, balanced against queue length
    messages.py      what the ingress and the replicas send each other
    metrics.py       Prometheus metrics
    errors.py        OpenAI error bodies and status codes
"""
