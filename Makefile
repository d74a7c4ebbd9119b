# MoE-to-dense distillation. `make help` lists targets and variables.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

TEACHER ?= smollm2-moe
STUDENT ?= derived
PRESET ?= default
SET ?=
DATA ?=
RUN ?=
RUNS_DIR ?= $(CURDIR)/runs
PYTEST_ARGS ?=
# pytest-xdist workers for make test (0: one process). Each test file stays in one worker (--dist loadfile):
# most of the suite's time is processes importing torch, transformers and mlflow, which two cores do at once.
TEST_WORKERS ?= 2
# Threads per test process (OMP_NUM_THREADS; pipelines the tests start inherit it). Two workers on two cores,
# each running torch's two threads, spin against each other: one thread each ran three pipeline test files 13%
# faster in wall time and 18% less CPU (2026-12-03, 2 cores).
TEST_THREADS ?= 1
PORT ?= 5000
GPUS ?= 1
TIME_LIMIT ?= 0

# The hub is off unless a user with hub access says otherwise (HF_HUB_OFFLINE=0 make distill ...).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: help install distill sweep ab show-config test ui compare compare-derivations bench-kernels bench-latency bench-distill bundle clean

help: ## this list
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "Variables (current value):"
	@echo "  TEACHER=$(TEACHER)   smollm2-moe (built here), a local MoE folder, or a hub id"
	@echo "  STUDENT=$(STUDENT)   derived (from the teacher), a config.json (random init), a local dense folder, or a hub id"
	@echo "  PRESET=$(PRESET)     one of: $$(ls configs | sed 's/.yaml//' | tr '\n' ' ')or a YAML file"
	@echo "  SET=\"k=v ...\"        config overrides, e.g. SET=\"distill.lr=1e-4 eval.limit=50\""
	@echo "  DATA=<path>          your own text: JSONL / chat JSONL / Parquet / .txt,.md file or folder / datasets folder"
	@echo "  RUN=<name>           run folder name under RUNS_DIR (default: teacher--student--preset)"
	@echo "  RUNS_DIR=$(RUNS_DIR)"
	@echo "  GPUS=$(GPUS)               processes (accelerate launch): logits and distill data-parallel, the rest on rank 0"
	@echo "  TIME_LIMIT=<s>       stop cleanly before this many seconds (exit 75); the same command resumes"
	@echo "  TRIALS=<n> STEPS=<n> make sweep: Optuna trials, optimizer steps per trial (default: moe-distill sweep --help)"
	@echo "  TEST_WORKERS=$(TEST_WORKERS)       make test: pytest processes, one test file each at a time (0: one process)"
	@echo "  TEST_THREADS=$(TEST_THREADS)       make test: threads per test process (OMP_NUM_THREADS)"
	@echo "  MLFLOW_TRACKING_URI  $(MLFLOW_TRACKING_URI)"
	@echo "  HF_HUB_OFFLINE=$(HF_HUB_OFFLINE)  set 0 to allow hub ids"
	@echo "  DISTILL_BUNDLE=<dir>   offline machine: install and fetch from a \`make bundle\` folder"

BUNDLE_PYTHON ?= 3.12

ifdef DISTILL_BUNDLE
# A GPU machine without registries (make bundle): its own torch and triton stay (system site packages); every
# other package comes from the bundle, and resources.fetch reads the resources from it.
export DISTILL_BUNDLE
$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -m resources.bundle link-site $(VENV)
	$(PYTHON) -m resources.bundle wheels "$(DISTILL_BUNDLE)" $(VENV)/bundle-wheels
	$(PY) -m pip install -q --no-index --no-deps --no-build-isolation $(VENV)/bundle-wheels/*
	$(PY) -m pip install -q --no-index --no-deps --no-build-isolation -e .
	@touch $@
else
# requirements.lock pins every transitive package (resources/lockfile.py); pyproject.toml decides which.
# pip byte-compiles what it installs one file at a time (100 of the install's 143 s on the 2-core box); compileall
# does it on every core. It must happen at install: with PYTHONDONTWRITEBYTECODE set, as on this project's
# machines, Python never writes the cache itself, and every process would compile torch again. Some files are
# written for newer Pythons (torch's py312 test helpers) and fail to compile, which pip ignores too: hence `|| true`.
$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c requirements.lock -e ".[test]"
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  >/dev/null 2>&1 || true
	@touch $@
endif

install: $(VENV)/.installed ## create .venv and install the pinned dependencies

# GPUS=<n> > 1: accelerate launch, one process per GPU (on a machine without GPUs: n CPU processes on gloo).
ifeq ($(GPUS),1)
LAUNCH = $(VENV)/bin/moe-distill run
else
LAUNCH = $(VENV)/bin/accelerate launch --multi_gpu --num_processes $(GPUS) --num_machines 1 \
	--mixed_precision no --dynamo_backend no -m pipelines.run
endif

# GNU make exits 2 whatever a recipe's code was (Ctrl-C excepted: make dies of SIGINT and the shell sees 130), so
# the pipeline's own code is printed here, and `moe-distill run` (same options) returns it for scripts.
distill: $(VENV)/.installed ## run the whole pipeline (TEACHER, STUDENT, PRESET, SET, DATA, RUN, GPUS)
	@$(LAUNCH) --teacher "$(TEACHER)" --student "$(STUDENT)" --preset "$(PRESET)" \
		--set "$(SET)" --data "$(DATA)" --run-name "$(RUN)" --runs-dir "$(RUNS_DIR)" --time-limit "$(TIME_LIMIT)"; \
		rc=$$?; \
	case $$rc in 0) ;; 3) echo "pipeline exit code 3: fix the input named above, then rerun" >&2 ;; \
	  75) echo "pipeline exit code 75: time limit reached; run the same command again to continue" >&2 ;; \
	  *) echo "pipeline exit code $$rc" >&2 ;; esac; \
	[ $$rc -eq 0 ] || echo "(make reports every failure as exit 2; scripts get the code above from: $(VENV)/bin/moe-distill run ...)" >&2; \
	exit $$rc

# `moe-distill sweep` (same options) returns the sweep's own exit code for scripts; make reports failures as 2.
TRIALS ?=
STEPS ?=
sweep: $(VENV)/.installed ## search the KD recipe (Optuna, TRIALS, STEPS) and write the best as a preset for PRESET=
	@$(VENV)/bin/moe-distill sweep --teacher "$(TEACHER)" --student "$(STUDENT)" --preset "$(PRESET)" \
		--set "$(SET)" --data "$(DATA)" --run-name "$(RUN)" --runs-dir "$(RUNS_DIR)" \
		$(if $(TRIALS),--trials "$(TRIALS)") $(if $(STEPS),--steps "$(STEPS)")

BEST ?=
ab: $(VENV)/.installed ## KD recipes side by side at one budget with intervals: cache, on-policy, layer-wise (BEST=<sweep preset> adds it)
	@$(VENV)/bin/moe-distill ab --teacher "$(TEACHER)" --student "$(STUDENT)" --preset "$(PRESET)" \
		--set "$(SET)" --data "$(DATA)" --run-name "$(RUN)" --runs-dir "$(RUNS_DIR)" --time-limit "$(TIME_LIMIT)" \
		$(if $(BEST),--best "$(BEST)")

show-config: $(VENV)/.installed ## every config key of a run (TEACHER, STUDENT, PRESET, SET, RUN) and where it came from
	@$(VENV)/bin/moe-distill show-config --teacher "$(TEACHER)" --student "$(STUDENT)" --preset "$(PRESET)" \
		--set "$(SET)" --run-name "$(RUN)"

test: $(VENV)/.installed ## unit tests + end-to-end test on tiny models
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

ui: $(VENV)/.installed ## MLflow UI on http://127.0.0.1 (PORT=5000)
	$(VENV)/bin/moe-distill ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --port $(PORT)

compare: $(VENV)/.installed ## Pareto plot of quality vs speedup over every distill run in MLflow
	$(VENV)/bin/moe-distill compare --out runs/compare

compare-derivations: $(VENV)/.installed ## derivation methods, same KD budget each -> docs/results/derivation_methods.md
	$(PY) -m pipelines.derivation_study --preset "$(PRESET)" --set "$(SET)"

# h100, h200, ... from the GPU's name, so results of different GPUs sit side by side.
GPU_TAG = $$($(PY) -c "import torch; print(torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else 'none')")

bench-kernels: $(VENV)/.installed ## GPU: fused MoE kernels vs transformers eager/grouped_mm -> bench/results/
	$(PY) -m bench.moe_layer --out bench/results/moe_layer_$(GPU_TAG).csv
	$(PY) -m bench.launch_overhead --out bench/results/launch_overhead_$(GPU_TAG).csv
	$(PY) -m bench.moe_gemm --out bench/results/moe_gemm_$(GPU_TAG).csv

bench-latency: $(VENV)/.installed ## GPU: default teacher (stock, fused) vs student serving latency, both decode paths
	$(PY) -m bench.latency --out bench/results/latency_$(GPU_TAG).csv

bench-distill: $(VENV)/.installed ## GPU: fused KD loss vs plain PyTorch/Liger, and student training MFU -> bench/results/
	$(PY) -m bench.kd_loss --out bench/results/kd_loss_$(GPU_TAG).csv
	$(PY) -m bench.train_throughput --unfused --out bench/results/train_throughput_$(GPU_TAG).csv

bundle: $(VENV)/.installed ## offline bundle for a GPU machine: wheels for BUNDLE_PYTHON, resources, weights -> bundle/
	$(PY) -m resources.bundle build --out bundle --python $(BUNDLE_PYTHON)

clean: ## remove runs/ and the MLflow store (keeps .venv and the resource cache)
	rm -rf runs mlflow.db mlartifacts
