# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for the pure suites: one per core
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test test-faults check lint typecheck unit integration bench loadtest serve install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kairos demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# The pure suites (no Ray: starting it there raises), in their own processes, one per core
unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/property -q -n $(TEST_WORKERS) --durations=10

# One local Ray cluster (with Serve) shared by the whole process
integration: $(STAMP)
	$(BIN)/pytest tests/integration tests/faults tests/e2e -q -m "not faults" --durations=15

# The long fault-injection runs (actors killed during 2M-event replays, ...); CI runs them too
test-faults: $(STAMP)
	$(BIN)/pytest tests/faults -q -m faults

# The fast inner loop: lint, types, unit tests and a fifth of the property examples (< 1 min)
check: lint typecheck
	KAIROS_QUICK_TESTS=1 $(BIN)/pytest tests/unit tests/property -q -n $(TEST_WORKERS)

# The whole suite; what CI runs (.ci/run)
test: lint typecheck unit integration

bench: $(STAMP)
	$(BIN)/python loadtests/bench_throughput.py --shards 1 2 4

serve: $(STAMP)
	$(BIN)/kairos serve --dev

# Locust headless against a local `kairos serve`, then: events accepted = events applied
loadtest: $(STAMP)
	$(BIN)/python loadtests/run_loadtest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache kairos-data
