# swarmtrain — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch where there is no NVIDIA GPU; a GPU machine gets the default (CUDA) build.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`; each takes whole files (a module's stack is started once)
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help setup demo up test faults soak fuzz lint typecheck smoke bench compose-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create the virtualenv and install the project with its dev tools

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: default torch build"; \
	else echo "no GPU: installing the CPU build of torch"; $(BIN)/python -m pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup ## start the stack, train the sample dataset across 3 peers, show progress and the result
	$(BIN)/swarmtrain demo --peers 3

up: setup ## run the whole stack on this machine until Ctrl-C
	$(BIN)/swarmtrain up --peers 3

test: setup ## run the test suite (real nats-server and PostgreSQL, started by the fixtures), TEST_WORKERS files at a time
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

faults: setup ## the fault suite alone: real processes killed, stopped, cut off; the checker's three zeros (docs/faults.md)
	$(BIN)/python -m pytest tests/faults $(PYTEST_ARGS)

SOAK_MINUTES ?= 10
SOAK_SEED ?= 1
soak: setup ## seeded random single and double faults against sweeps and fedavg sessions for SOAK_MINUTES (not in CI)
	$(BIN)/python -m tests.faults.soak --minutes $(SOAK_MINUTES) --seed $(SOAK_SEED)

FUZZ_CASES ?= 2000
fuzz: setup ## schemathesis fuzz of the gateway's OpenAPI, FUZZ_CASES generated requests (CI runs 300)
	FUZZ_CASES=$(FUZZ_CASES) $(BIN)/python -m pytest tests/gateway/test_gateway_fuzz.py -s -o timeout=0 $(PYTEST_ARGS)

lint: setup ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup ## mypy (strict): the libraries, the services and the benchmarks
	$(BIN)/mypy libs services bench

smoke: setup ## the outside-in acceptance check in ../shared/acceptance
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python ../shared/acceptance/smoke.py

bench: setup ## run the benchmarks in bench/ (about 4 minutes on 2 cores; see BENCHMARKS.md)
	$(BIN)/python -m bench.run

compose-check: setup ## compose.yaml in a real engine: the README's steps, sweep + fedavg via REST, the ha profile losing its stream leader (deploy/check/)
	VENV_BIN=$(abspath $(BIN)) deploy/check/compose-check.sh

clean: ## remove the virtualenv and local state
	rm -rf $(VENV) .swarmtrain .pytest_cache .mypy_cache .ruff_cache
