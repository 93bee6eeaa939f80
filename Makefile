# Two commands do all the set-up on a fresh machine:
#   make serve   install what is needed, then `serve run serve_config.yaml`
#   make test    install what is needed, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test loadtest bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]" --config-settings editable_mode=compat
	touch $@

serve: install
	RAY_SERVE_PROXY_USE_GRPC=$${RAY_SERVE_PROXY_USE_GRPC:-1} RAY_worker_niceness=$${RAY_worker_niceness:-0} \
		RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=$${RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD:-0} $(BIN)/serve run serve_config.yaml

test: install
	$(BIN)/python -m pytest -q tests

# Load test of a server that is already up: start `make serve` in another terminal
# first; this starts nothing. Steps of 1,2,4,...,256 users, 15 s each; writes
# runs/loadtest-<time>/ (report.md, plot.png, locust CSVs and HTML). Options:
#   make loadtest LOADTEST_HOST=http://host:port LOADTEST_ARGS="--steps 1,8,64 --step-time 30"
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/python -m loadtest.run --host $(LOADTEST_HOST) $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV)
