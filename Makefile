# One entry point for people and CI. `make test` and `make demo` set up
# everything they need on a fresh machine: the virtualenv, the devstack
# binaries (built from the Go module proxy, cached in ~/.cache), the servers.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STACK := devstack/stack
PYTEST_FLAGS ?=

.PHONY: help venv lint fmt unit stack-up stack-down integration e2e test demo demo-down bench lock clean

help:
	@echo "make test       lint, type-check, unit, integration and e2e tests against the real devstack"
	@echo "make demo       start the stack and the operator, apply examples/, show what happens"
	@echo "make demo-down  stop the demo operator and the stack"
	@echo "make lint       ruff and mypy only"
	@echo "make lock       re-resolve constraints.txt from pyproject.toml"

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check operator tests bench
	$(BIN)/ruff format --check operator tests bench
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff format operator tests bench
	$(BIN)/ruff check --fix operator tests bench

unit: venv
	$(BIN)/pytest tests/unit -q $(PYTEST_FLAGS)

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

integration: venv stack-up
	RBO_FORBID_SKIPS=1 $(BIN)/pytest tests/integration -m integration $(PYTEST_FLAGS)

e2e: venv stack-up
	@if [ -n "$$(ls tests/e2e/test_*.py 2>/dev/null)" ]; then \
	  RBO_FORBID_SKIPS=1 $(BIN)/pytest tests/e2e -m e2e $(PYTEST_FLAGS); \
	else echo "no e2e tests yet"; fi

test: lint unit integration e2e

demo: venv stack-up
	bash devstack/demo.sh up

demo-down:
	-bash devstack/demo.sh down
	$(STACK) down

bench: venv stack-up
	@for b in bench/*.py; do $(BIN)/python $$b; done

lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --disable-pip-version-check '.[dev]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^resultbackend-operator' > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
