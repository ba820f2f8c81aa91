# fsl: MAML few-shot classification. `make help` lists the targets.
#
# Cells are derived from the config files: experiments/<dataset>-<arch>-<K>shot.yaml gives `make <dataset>-<arch>-<K>shot`.
#   ARGS="key=value ..."  config overrides passed to train and test (e.g. ARGS="device=cpu data.root=/data/cub")
#   QUICK=1               short sanity run (quick=true): few hundred tasks, 100 test episodes, rows marked quick
#   GPUS=P                train and test with P processes on this node (torchrun; P must divide train.meta_batch)
#   SEEDS=N               train and test seeds 0..N-1, each its own run (work dir <run>-seed<N>, summary row)
#   GPUS_PER_CELL=K       all-tables/slurm: run cells concurrently on groups of K GPUs (fsl sweep / a job array)
# Variants of the inner loop (experiments/variants/<cell>-<variant>.yaml) are targets too: `make glyphs-conv4-1shot-anil`.

SHELL := /bin/bash
# The Python for .venv: PYTHON_BIN when given, else the newest of python3.13, python3.12, python3.11 on PATH that
# runs (a pyenv shim of a version not selected is on PATH but does not run)
PYTHON_BIN ?= $(firstword $(foreach v,3.13 3.12 3.11,$(shell python$(v) -c 'import sys; print(sys.executable)' 2>/dev/null)))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsl-setup-stamp

CONFIGS := $(filter-out experiments/_%,$(wildcard experiments/*.yaml))
CELLS := $(patsubst experiments/%.yaml,%,$(CONFIGS))
PAPER_CELLS := $(filter-out glyphs-% folder-% omniglot-%,$(CELLS))
OMNIGLOT_CELLS := $(filter omniglot-%,$(CELLS))
VARIANT_CONFIGS := $(wildcard experiments/variants/*.yaml)
VARIANTS := $(patsubst experiments/variants/%.yaml,%,$(VARIANT_CONFIGS))
GLYPHS_RUNS := $(filter glyphs-%,$(CELLS)) $(filter glyphs-%,$(VARIANTS))

QUICK ?=
ARGS ?=
RUN_ARGS := $(ARGS) $(if $(QUICK),quick=true,)
GPUS ?= 1
SEEDS ?=
ifneq ($(SEEDS),)
ifeq ($(shell [ "$(SEEDS)" -ge 1 ] 2>/dev/null && echo ok),)
$(error SEEDS=$(SEEDS): the number of seeds to run (seeds 0 .. SEEDS-1), a whole number >= 1; e.g. SEEDS=3)
endif
endif
SEED_ARGS := $(if $(SEEDS),$(foreach s,$(shell seq 0 $$(($(SEEDS) - 1))),seed=$(s)),_)
FSL := $(if $(filter-out 1,$(GPUS)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(GPUS) -m fsl,$(PY) -m fsl)

.PHONY: help setup test test-fast lint fidelity demo all-tables omniglot slurm variants tables bench bench-data data-cub data-mini-imagenet \
	data-tiered-imagenet data-omniglot clean-venv $(CELLS) $(VARIANTS)

help:
	@echo "make setup                 create .venv (newest Python 3.11-3.13, or PYTHON_BIN) with the pinned stack and the fsl command"
	@echo "make demo                  train + test + tables on the built-in glyphs data (minutes on a CPU)"
	@echo "make test                  the linter, then the whole test suite (CPU; ~20 min on 2 cores)"
	@echo "make test-fast             the linter, then the in-process tests only (CONTRIBUTING.md)"
	@echo "make lint                  ruff (pyproject.toml [tool.ruff])"
	@echo "make fidelity              MMFewShot 0.1.0's MAML beside fsl's, float64 (benchmarks/results/fidelity-mmfewshot.md)"
	@echo "make <cell> [GPUS=P] [SEEDS=N]  train then test one cell (P processes via torchrun; N seeds); cells: $(CELLS)"
	@echo "make <cell>-<variant>      the same for a variant config of experiments/variants: $(VARIANTS)"
	@echo "make all-tables            run every paper cell not yet done, then build the tables"
	@echo "make all-tables GPUS_PER_CELL=K  the same, cells concurrently on groups of K visible GPUs (fsl sweep)"
	@echo "make slurm PARTITION=p ACCOUNT=a TIME=hh:mm:ss [GPUS_PER_CELL=K] [SUBMIT=1]  Slurm job array of them"
	@echo "make omniglot              the MAML paper's 4 Omniglot cells not yet done, then the tables (results/tables/omniglot.md)"
	@echo "make variants              every glyphs variant not yet done (CPU, ~1.5 h), then results/tables/variants.md"
	@echo "make tables                build results/tables and results/plots from results/*.csv"
	@echo "make bench [QUICK=1]       GPU speed proxies (ops per task, syncs, input wait), then meta-training speed and memory"
	@echo "make bench-data            episode pipeline throughput and memory benchmark"
	@echo "make data-cub|data-mini-imagenet|data-tiered-imagenet|data-omniglot   download and lay out a dataset under data/"

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt scripts/install_learn2learn.sh pyproject.toml
	@test -x $(PY) || test -n "$(PYTHON_BIN)" || { echo "make setup: no python3.13, python3.12 or python3.11 on PATH; fix: install one, or give PYTHON_BIN=/path/to/python3.1x" >&2; exit 1; }
	@test -x $(PY) && echo "make setup: reusing $(VENV) ($$($(PY) -V))" || { echo "make setup: creating $(VENV) with $(PYTHON_BIN) ($$($(PYTHON_BIN) -V))"; $(PYTHON_BIN) -m venv $(VENV); }
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	bash scripts/install_learn2learn.sh $(PY)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "from fsl.data import native; native.load()"   # the native crop gather (fsl/data/native.py), built once
	touch $@

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=25 tests   # the 25 slowest tests listed, to keep CI within its time

test-fast: $(STAMP) lint   # the in-process tests only (no fsl/make/torchrun subprocess): a few minutes
	$(PY) -m pytest -q -m "not slow" tests

# MMFewShot 0.1.0 beside fsl (#35): a side environment on fsl's torch, then the step-by-step comparison; fails past
# its tolerances. tests/test_mmcls_pixels.py (in `make test`) uses the same environment.
MMFEWSHOT_VENV := .venv-mmfewshot
fidelity: $(STAMP)
	bash scripts/install_mmfewshot.sh $(PY) $(MMFEWSHOT_VENV)
	$(MMFEWSHOT_VENV)/bin/python benchmarks/fidelity_mmfewshot.py --out benchmarks/results/fidelity-mmfewshot.md

lint: $(STAMP)             # ruff's default rules plus import sorting (pyproject.toml [tool.ruff])
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) -m fsl demo $(ARGS)

# one run per seed (SEEDS=N), or one run with the config's seed ("_" = no seed override)
define train_and_test
	@for seed in $(SEED_ARGS); do \
	  extra=$$( [ "$$seed" = _ ] || echo $$seed ); \
	  $(FSL) train $(1) $(RUN_ARGS) $$extra && $(FSL) test $(1) $(RUN_ARGS) $$extra || exit 1; \
	done
endef

$(CELLS): %: $(STAMP)
	$(call train_and_test,experiments/$@.yaml)

$(VARIANTS): %: $(STAMP)
	$(call train_and_test,experiments/variants/$@.yaml)

all-tables: $(STAMP)
ifdef GPUS_PER_CELL
	$(PY) -m fsl sweep $(addprefix experiments/,$(addsuffix .yaml,$(PAPER_CELLS))) $(RUN_ARGS) --gpus-per-cell $(GPUS_PER_CELL)
else
	@for cell in $(PAPER_CELLS); do \
	  $(PY) -m fsl done experiments/$$cell.yaml $(RUN_ARGS); done=$$?; \
	  if [ $$done = 0 ]; then echo "skip $$cell: comparable result exists for this config"; \
	  elif [ $$done = 1 ]; then $(MAKE) --no-print-directory $$cell || exit 1; else exit $$done; fi; \
	done
	$(PY) -m fsl tables
endif

# fsl done exits 0 (done), 1 (not done) or 2 (an error, e.g. a malformed summary.csv: stop rather than retrain)
omniglot: $(STAMP)
	@for cell in $(OMNIGLOT_CELLS); do \
	  $(PY) -m fsl done experiments/$$cell.yaml $(RUN_ARGS); done=$$?; \
	  if [ $$done = 0 ]; then echo "skip $$cell: result exists for this config"; \
	  elif [ $$done = 1 ]; then $(MAKE) --no-print-directory $$cell || exit 1; else exit $$done; fi; \
	done
	$(PY) -m fsl tables

slurm: $(STAMP)
	$(PY) -m fsl slurm $(addprefix experiments/,$(addsuffix .yaml,$(PAPER_CELLS))) $(RUN_ARGS) \
	  $(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
	  $(if $(TIME),--time $(TIME)) $(if $(GPUS_PER_CELL),--gpus $(GPUS_PER_CELL)) $(if $(SUBMIT),--submit)

variants: $(STAMP)
	@for run in $(GLYPHS_RUNS); do \
	  config=experiments/$$run.yaml; [ -f $$config ] || config=experiments/variants/$$run.yaml; \
	  $(PY) -m fsl done $$config $(RUN_ARGS); done=$$?; \
	  if [ $$done = 0 ]; then echo "skip $$run: result exists for this config"; \
	  elif [ $$done = 1 ]; then $(MAKE) --no-print-directory $$run || exit 1; else exit $$done; fi; \
	done
	$(PY) -m fsl tables

tables: $(STAMP)
	$(PY) -m fsl tables

bench: $(STAMP)
	$(PY) benchmarks/step_proxies.py --before $(if $(QUICK),--archs conv4 --out benchmarks/results/step-proxies-quick.md,)
	$(PY) benchmarks/meta_train_speed.py $(if $(QUICK),--quick,)

bench-data: $(STAMP)
	$(PY) benchmarks/episode_pipeline.py

data-cub data-mini-imagenet data-tiered-imagenet data-omniglot: data-%: $(STAMP)
	$(PY) -m fsl data prepare $* --root data/$*

clean-venv:
	rm -rf $(VENV)
