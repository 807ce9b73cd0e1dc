# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= SmolLM2-135M-Instruct.Q4_1.gguf
ARGS   ?=
# llama-cpp-python compiles from source; pip caches the wheel it builds.
# GPU builds: CMAKE_ARGS="-DGGML_CUDA=on" make reinstall-llama  (or -DGGML_METAL=on)

.PHONY: install dev models test-models chromium llama-server run test lint bench agents-check \
	reinstall-llama clean

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

# The browser UI tests (tests/test_ui_browser.py) drive Debian's Chromium through Playwright
# (Playwright's own browser downloads are not used): installed with apt-get when missing.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium with apt-get (for the browser UI tests)"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || \
		{ $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; \
	else \
		echo "WARNING: /usr/bin/chromium is missing and apt-get is not available: install" \
		     "Chromium at /usr/bin/chromium yourself; until then the browser UI tests are skipped." >&2; \
	fi

# llama-server for the backend tests (issue 11), built from the llama.cpp in the pinned
# llama-cpp-python sdist into ~/.cache/llmserve/llama-server/<version>-cpu: 10-20 minutes on
# 2 cores the first time, skipped after (`llmserve install llama` checks version and flags).
LLAMA_JOBS ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)
llama-server: install
	$(PY) -m llmserve install llama --jobs $(LLAMA_JOBS)

run: models
	$(PY) server.py --model_name $(MODEL) $(ARGS)

# Lint first (ruff, then mypy --strict: ~12 s cold, under 1 s with its cache): any finding
# fails the target before the tests run.
test: dev test-models chromium llama-server
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

lint: dev
	$(PY) -m ruff check .
	$(PY) -m mypy

# The real Claude Code and Codex CLIs (pinned, from npm, cached) against server.py with defaults,
# every other host blocked; PASS/FAIL per check. Not part of `make test`: it takes minutes.
agents-check: install test-models
	$(PY) tests/agents_check.py

bench: dev models
	$(PY) benchmarks/decode.py

reinstall-llama: install
	CMAKE_ARGS="$(CMAKE_ARGS)" $(PY) -m pip install --force-reinstall --no-deps --no-cache-dir \
		$$(grep '^llama-cpp-python==' requirements.txt)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
