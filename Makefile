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
	$(BIN)/serve run serve_config.yaml

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
