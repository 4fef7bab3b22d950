# The two commands a user needs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/mtseg demo

test: setup lint
	$(BIN)/python -m pytest tests

# An import that goes up a layer (pyproject.toml [tool.importlinter]) or a lint error fails the tests.
lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check mtseg tests benchmarks jobs
	$(BIN)/ruff format --check mtseg tests benchmarks jobs

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup
	for b in ingest multitask train_overhead evaluate tune_overhead gpu shard; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf runs .pytest_cache build *.egg-info
