# One command to set up and run the benchmark, one to run the tests (see README.md).
# Both create the virtual environment .venv on first use and reuse it afterwards; nothing needs
# activating (every command below calls .venv/bin/... directly).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all
# Extra Snakemake arguments, e.g. ARGS="--config seeds=[0,1]" or ARGS="--configfile config/paper.yaml"
ARGS   ?=
# Where torch comes from. Default: PyTorch's CPU-only wheels (about 200 MB; PyPI's Linux wheel bundles
# CUDA, several GB). When that index cannot be reached, torch comes from the default index (pip's own
# settings). For a CUDA build on a fresh clone: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/^torch==\([^ #]*\).*/\1/p' requirements-cpu.txt)

.PHONY: setup reproduce plan test test-slow test-slurm benchmarks clean-work

setup: $(STAMP)

$(STAMP): requirements-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --retries 0 --timeout 30 --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION) \
	  || { echo "torch: $(TORCH_INDEX) not reachable, installing torch==$(TORCH_VERSION) from the default index"; \
	       $(BIN)/pip install --quiet torch==$(TORCH_VERSION); }
	$(BIN)/pip install --quiet -r requirements-cpu.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## The main job: the grid of config/config.yaml (one seed of CiteULike-t) on the local CPU. Prints
## the jobs and a time estimate before the first job; results go to work/results/.
reproduce: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) --profile profiles/local $(ARGS)

## What `make reproduce` would run and the time estimate (a dry run: nothing is executed).
plan: $(STAMP)
	$(BIN)/python -m hetcomp.plan --cores $(CORES) --profile profiles/local $(ARGS)

## The default test suite (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest

## Long tests: real-data training runs.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

## The workflow through a throw-away local SLURM cluster (needs root and apt).
test-slurm: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -m slurm

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/teacher_speed.py
	$(BIN)/python benchmarks/hetcomp_speed.py
	$(BIN)/python benchmarks/workflow_speed.py

clean-work:
	rm -rf work .snakemake
