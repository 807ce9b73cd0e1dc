# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= SmolLM2-135M-Instruct.Q4_1.gguf
ARGS   ?=
# llama-cpp-python compiles from source; pip caches the wheel it builds.
# GPU builds: CMAKE_ARGS="-DGGML_CUDA=on" make reinstall-llama  (or -DGGML_METAL=on)

.PHONY: install dev models test-models run test lint bench reinstall-llama clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

models: install
	$(PY) -m llmserve models pull smollm2-135m

test-models: install
	$(PY) -m llmserve models pull smollm2-135m gemma3-270m

run: models
	$(PY) server.py --model_name $(MODEL) $(ARGS)

test: dev test-models
	$(PY) -m pytest

lint: dev
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: dev models
	$(PY) benchmarks/decode.py

reinstall-llama: install
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PY) -m pip install --force-reinstall --no-deps --no-cache-dir \
		$$(grep '^llama-cpp-python==' requirements.txt)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
