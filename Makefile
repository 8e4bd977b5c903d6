# qpeft-bench — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SWEEP ?= smoke
RESULTS ?= runs
ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: a bare 'torch' requirement would pull a multi-GB CUDA build (see constraints.txt)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,slurm]"
	@touch $(STAMP)

setup: $(STAMP) ## create the virtualenv and install everything (offline-safe: registries only)

run: $(STAMP) ## one run with the default config (tiny model, NF4+DQ, LoRA); extra overrides: make run ARGS="peft.r=16"
	HF_HUB_OFFLINE=1 $(VENV)/bin/qpeft-bench $(ARGS)

plan: $(STAMP) ## plan-mode accounting of LLaMA-2-7B NF4 LoRA r64 (no weights): make plan ARGS="model=llama2_70b"
	HF_HUB_OFFLINE=1 $(VENV)/bin/qpeft-bench mode=plan model=llama2_7b quant=nf4 peft=lora peft.r=64 peft.alpha=16 $(ARGS)

sweep: $(STAMP) ## run a named sweep: make sweep SWEEP=smoke (completed runs are skipped)
	HF_HUB_OFFLINE=1 $(VENV)/bin/qpeft-bench -m sweep=$(SWEEP) $(ARGS)

report: $(STAMP) ## tables from the run records: make report RESULTS=runs
	$(VENV)/bin/qpeft-bench-report $(RESULTS)

docs-figures: $(STAMP) ## the report example in docs/figures/ (a 2-seed smoke sweep, ~10 min on a CPU)
	VENV=$(VENV) scripts/docs_figures.sh

test: $(STAMP) ## the fast test suite (what CI runs)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not gpu and not slurm" $(ARGS)

test-full: $(STAMP) ## every CPU test, slow ones included
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu and not slurm" $(ARGS)

test-slurm: $(STAMP) ## sweeps through a real SLURM on localhost (first: sudo scripts/slurm_cluster.sh start)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slurm tests/test_slurm.py $(ARGS)

check-wheel: $(STAMP) ## build the wheel, install it into a fresh venv, run its entry points from outside the checkout
	PYTHON=$(PY) scripts/check_wheel.sh

format: $(STAMP) ## format the code with ruff
	$(VENV)/bin/ruff format qpeft_bench tests scripts
	$(VENV)/bin/ruff check --fix qpeft_bench tests scripts

lint: $(STAMP) ## check style with ruff (what CI runs before the tests)
	$(VENV)/bin/ruff check qpeft_bench tests scripts
	$(VENV)/bin/ruff format --check qpeft_bench tests scripts

clean: ## remove caches and scratch runs (keeps the virtualenv and results/)
	rm -rf runs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## also remove the virtualenv
	rm -rf $(VENV)

.PHONY: help setup run plan sweep report docs-figures test test-full test-slurm check-wheel format lint clean distclean
