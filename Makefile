# Two commands for a newcomer:  `make demo` (set up + run the main job)  and  `make test` (set up + run the tests).
# Both are idempotent: the environment is rebuilt only when pyproject.toml or the set-up scripts change.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_system.sh Makefile
	bash scripts/setup_system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/betterai pipeline --config examples/configs/tiny_pipeline.yaml run.dir=runs/demo

test: setup
	bash scripts/run_tests.sh $(PYTEST_ARGS)

BENCH ?=
bench: setup
	$(PY) -m benchmarks $(BENCH)

clean:
	rm -rf runs/demo
