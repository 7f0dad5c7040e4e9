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
# The data-plane bench's Celery: a separate virtualenv with what the worker image has
# (the operator's has no Celery). The e2e tests run the worker image itself, as pods.
E2E_VENV := .venv-e2e
E2E_BIN := $(E2E_VENV)/bin
RESULTSTORES := contrib/celery-resultstores

.PHONY: help venv e2e-venv lock-e2e lint fmt unit stack-up stack-down images integration e2e test demo demo-down bench lock clean

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

# Celery 5.x with its couchdb, consul and redis extras, pinned by tests/e2e/constraints.txt,
# plus contrib/celery-resultstores (the Consul backend fix) as a worker image would install it.
$(E2E_BIN)/.installed: tests/e2e/constraints.txt $(RESULTSTORES)/pyproject.toml $(wildcard $(RESULTSTORES)/celery_resultstores/*.py)
	$(PY) -m venv $(E2E_VENV)
	$(E2E_BIN)/pip install -q --disable-pip-version-check -c tests/e2e/constraints.txt 'celery[couchdb,consul,redis]>=5,<6'
	$(E2E_BIN)/pip install -q --disable-pip-version-check --no-deps --force-reinstall ./$(RESULTSTORES)
	touch $@

e2e-venv: $(E2E_BIN)/.installed

# Everything with Python in it; devstack's scripts have no .py suffix, so they are named.
PY_TREES := operator tests bench contrib devstack/stack devstack/rbac-audit

lint: venv
	$(BIN)/ruff check $(PY_TREES)
	$(BIN)/ruff format --check $(PY_TREES)
	$(BIN)/mypy
	$(BIN)/mypy bench
	$(BIN)/mypy devstack/stack
	$(BIN)/mypy devstack/rbac-audit
	$(BIN)/hadolint Dockerfile tests/e2e/worker/Dockerfile

fmt: venv
	$(BIN)/ruff format $(PY_TREES)
	$(BIN)/ruff check --fix $(PY_TREES)

unit: venv
	$(BIN)/pytest tests/unit -q $(PYTEST_FLAGS)

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

# The operator runs as the chart's ServiceAccount (of a release named for this run);
# afterwards devstack/rbac-audit checks that what it requested (the apiserver's audit log)
# is exactly what the chart grants. RBAC_AUDIT=0 leaves the check out (for a -k subset).
RBAC_AUDIT ?= 1
integration: venv stack-up
	since=$$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ); release=rbo-it-$$$$; \
	RBO_OPERATOR_RELEASE=$$release RBO_FORBID_SKIPS=1 \
	  $(BIN)/pytest tests/integration -m integration $(PYTEST_FLAGS); \
	if [ "$(RBAC_AUDIT)" != 0 ]; then \
	  $(BIN)/python devstack/rbac-audit --release $$release --since "$$since"; fi

# Celery runs in worker pods of the worker image on the devstack node. tests/e2e/pod runs
# the operator as a pod too (the Dockerfile's image, `helm install`), in a pytest session
# of its own: no operator process may run beside it.
e2e: venv stack-up images
	RBO_FORBID_SKIPS=1 $(BIN)/pytest tests/e2e -m e2e --ignore=tests/e2e/pod $(PYTEST_FLAGS)
	RBO_FORBID_SKIPS=1 $(BIN)/pytest tests/e2e/pod -m e2e $(PYTEST_FLAGS)

# The operator image from the Dockerfile and the worker image from tests/e2e/worker/Dockerfile
# (buildah on a local Debian base, no Docker, no registry), cached by content and loaded
# into the devstack node.
images: stack-up
	$(STACK) images

test: lint unit integration e2e

demo: venv stack-up
	bash devstack/demo.sh up

demo-down:
	-bash devstack/demo.sh down
	$(STACK) down

# Every bench/bench_*.py in turn (bench/common.py is their library, not a bench), on the
# bench's own devstack instance (RBO_BENCH_STACK=shared: the shared one); see bench/README.md.
bench: venv e2e-venv
	$(BIN)/python bench/run_all.py

lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --disable-pip-version-check '.[dev]'
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^resultbackend-operator' > constraints.txt
	rm -rf .venv-lock

lock-e2e:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --disable-pip-version-check 'celery[couchdb,consul,redis]>=5,<6'
	{ echo '# The e2e worker image: Celery 5.x with its couchdb, consul and redis extras.'; \
	  echo '# Regenerate with `make lock-e2e`; .venv-e2e (the data-plane bench) is built from it too.'; \
	  .venv-lock/bin/pip freeze; } > tests/e2e/constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(E2E_VENV) .mypy_cache .ruff_cache .pytest_cache
