# One command to set up and run the benchmark, one to run the tests (see README.md).
# Both create the virtual environment .venv on first use and reuse it afterwards.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all
# Extra Snakemake arguments, e.g. ARGS="--config datasets=[citeulike-t] seeds=[0]"
ARGS   ?=

.PHONY: setup reproduce test test-slow test-slurm benchmarks clean-work

setup: $(STAMP)

$(STAMP): requirements-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-cpu.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## The main job: the default grid of config/config.yaml on the local CPU.
reproduce: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) --profile profiles/local $(ARGS)

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

clean-work:
	rm -rf work .snakemake
