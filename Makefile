# mu: `make demo` runs the main job on the bundled policy, `make test` runs the tests.
# Both set up what they need in .venv (idempotent; redone when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup setup-serve demo test bench protos lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# serving + simulator only: what a robot computer (and the demo) needs; no torch
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[serve,sim]'
	touch $@

# everything: torch's CPU build first, so nothing below pulls a CUDA build
$(VENV)/.all-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[serve,sim,train,cluster,dev]'
	touch $@ $(VENV)/.serve-installed

setup-serve: $(VENV)/.serve-installed
setup: $(VENV)/.all-installed

demo: setup-serve
	$(BIN)/python -m controller.robot.demo

test: setup
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: setup
	$(BIN)/python -m benchmarks.latency

protos: setup
	$(BIN)/python protos/generate.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
