# recurrent-bn. `make help` lists the targets. Every target installs the environment first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TASK ?= pmnist
MODEL ?= bn_lstm
ARGS ?=
GAMMAS ?= 0.1,0.3,0.5,0.7,1.0

.DEFAULT_GOAL := help
.PHONY: help install train sweep-gamma data bench bench-gpu gpu-kernels gpu-check gpu-bundle figures test test-slow lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: TASK=$(TASK) MODEL=$(MODEL) ARGS='<hydra overrides>'"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(STAMP) ## create .venv and install the package with its dev tools

train: $(STAMP) ## train one model: make train TASK=pmnist MODEL=bn_lstm ARGS="trainer.max_steps=100"
	$(PY) -m recurrent_bn.train task=$(TASK) model=$(MODEL) $(ARGS)

sweep-gamma: $(STAMP) ## multirun over the BN gamma init: make sweep-gamma TASK=pmnist
	$(PY) -m recurrent_bn.train --multirun task=$(TASK) model=bn_lstm model.gamma_init=$(GAMMAS) $(ARGS)

data: $(STAMP) ## download what is missing into the data root and verify every file
	$(PY) scripts/download_data.py

bench: $(STAMP) ## time the layers against torch.nn.LSTM, then the trainer end to end; results/bench*.csv
	$(PY) scripts/bench.py $(ARGS)
	$(PY) scripts/bench_trainer.py

bench-gpu: $(STAMP) ## GPU: cuDNN vs the Triton and reference paths at the paper's shapes; results/bench_gpu.csv
	$(PY) scripts/bench_gpu.py $(ARGS)

gpu-kernels: $(STAMP) ## compile the Triton kernels for sm_80/sm_90 (no GPU needed): registers, shared memory, spills
	$(PY) scripts/gpu_kernels.py

# No $(STAMP): a bare GPU machine has torch and Triton but no venv; the Hydra wheels travel in .gpu-bundle/.
gpu-check: ## GPU machine, ~10 min: versions, correctness vs float64, determinism, timings vs cuDNN, paper PTB pair
	$(PYTHON) scripts/gpu_check.py $(ARGS)

gpu-bundle: $(STAMP) ## wheels of Hydra, OmegaConf, antlr4 into .gpu-bundle/ (git-ignored) for make gpu-check
	$(PY) scripts/gpu_check.py --make-bundle

figures: $(STAMP) ## draw every figure into results/figures/ from the stored results
	$(PY) scripts/make_figures.py

test: $(STAMP) ## the test suite (fast tests; slow ones: make test-slow)
	$(PY) -m pytest -q

test-slow: $(STAMP) ## the slow tests (command-line runs, resume after SIGKILL, the notebooks, make train)
	$(PY) -m pytest -q -m slow

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

clean: ## remove caches (keeps .venv, data and runs)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info
