# `make test` and `make demo` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel on this machine's disk; an unpinned torch would pull CUDA packages.
TORCH_PIN ?= torch==2.13.0

.PHONY: test test-slow lint demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,notebooks]'
	touch $@

test: venv
	$(PY) -m pytest

test-slow: venv
	$(PY) -m pytest -m slow

# ruff's settings are in pyproject.toml; `ruff format . && ruff check --fix .` applies them.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The bundled demo pair at tp=2, speculative decoding with the draft copied into each worker.
DEMO_PROMPT := import os\n\n\nclass Reader:\n    def __init__(self, path):\n        
demo: venv
	$(VENV)/bin/nxd generate demo-llama --tp 2 --draft demo-llama-draft --no-compile \
		--max-new-tokens 96 --prompt "$$(printf '$(DEMO_PROMPT)')"

clean:
	rm -rf $(VENV) .pytest_cache
