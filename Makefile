# Set-up, quick start and tests. The set-up installs the tested versions in constraints.txt into
# .venv; torch is pinned there so a CPU-only machine never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast lint bench clean

$(BIN)/prune: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,charts]"
	@touch $@

install: $(BIN)/prune

## Install everything and run the quick-start pruning session (smollm2-135m, shakespeare, taylor, 20 %).
quickstart: install
	$(BIN)/prune run examples/quickstart.toml

## The whole test suite (a few end-to-end tests use the real smollm2-135m model).
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/bench_importance.py
	$(BIN)/python bench/bench_allocation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
