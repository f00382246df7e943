# Two set-up commands that work on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# constraints.txt pins torch: any pip call without it could pull a multi-GB CUDA build
PIP    := $(BIN)/python -m pip install -q -c constraints.txt
PYTEST_ARGS ?=
ARGS ?=

.PHONY: demo demo-vae test test-fast lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.installed-base: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[test,dev]'
	touch $(VENV)/.installed-base $@

## make demo: the whole chain on the CPU (≤ 15 min on 2 cores): VAE → latent cache → class-conditional LDM →
## sample grids → classifier judge → outputs/pipeline/demo/report.md; a re-run skips finished stages
## (extra args: ARGS='pipeline=demo_gpu' or any ldmlab.pipeline override)
demo: $(VENV)/.installed-base
	$(BIN)/python -m ldmlab.pipeline $(ARGS)

## make demo-vae: the old demo, the tiny VAE alone (= python train.py; extra args: ARGS='...')
demo-vae: $(VENV)/.installed-base
	$(BIN)/python train.py $(ARGS)

## make test: the whole suite (slow end-to-end runs included)
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make test-fast: the inner loop, without the subprocess end-to-end runs
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow and not slurm" -q $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests train.py

clean-venv:
	rm -rf $(VENV)
