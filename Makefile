# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here (with its matching torchvision), not in pyproject: see constraints.txt.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup demo demo-geneval test pipeline clean ui

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt $(TORCH_PIN) -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $(STAMP)

setup: $(STAMP)

demo: setup  ## the whole pipeline on the built-in offline default, via DVC
	$(BIN)/dvc repro
	@echo; echo "metrics (reports/metrics.json):"; $(BIN)/dvc metrics show reports/metrics.json reports/train_summary.json

# One torch thread unless OMP_NUM_THREADS says otherwise: the tiny 16x16 model gains nothing from a second
# thread, and on a loaded two-core machine two threads made pretraining 12x slower (README "GenEval").
demo-geneval: setup  ## the GenEval task on its built-in shapes world (params-geneval.yaml; outputs under *-geneval/)
	@start=$$(date +%s); OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/gdro pipeline --params params-geneval.yaml; \
	  echo; echo "metrics (reports-geneval/metrics.json):"; $(BIN)/python -m gdro_core.tasks.geneval.report reports-geneval/metrics.json; \
	  echo "minutes: $$(( ($$(date +%s) - start) / 60 ))"

pipeline: setup  ## the same stages as one Prefect flow, without DVC
	$(BIN)/gdro pipeline

ui: setup  ## Prefect and MLflow UIs on 127.0.0.1 plus the pipeline/sweep deployments; Ctrl-C stops them
	$(BIN)/gdro serve

# Two workers (pytest-xdist), each taking whole test modules in collection order (the longest first, tests/conftest.py
# `LONGEST_FIRST`), not by test count: most tests wait on `gdro`/`dvc` processes that use one
# core each, and the projects the tests only read are built once for both (tests/conftest.py `built_once`).
TEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

clean:
	rm -rf data models reports checkpoints mlflow.db mlartifacts .prefect data-geneval models-geneval reports-geneval

.PHONY: bench
BENCH_ARGS ?=
bench: setup  ## every objective, 3 seeds, CPU + wall seconds on the default world (after `make demo`); e.g. BENCH_ARGS="--train-budget 120"
	$(BIN)/python benchmarks/cpu_objectives.py $(BENCH_ARGS)
