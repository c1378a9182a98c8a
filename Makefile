# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv
# from this project's own files (torch pinned to the CPU build that installs from a local wheel).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  ?= .cache/checkpoints/small
PRESET ?= small

.PHONY: venv test lint serve bench checkpoint clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest

$(MODEL)/config.json: | venv
	$(VENV)/bin/baton make-checkpoint $(PRESET) --out $(MODEL)

checkpoint: $(MODEL)/config.json

# Streams a sample completion from the default model, then keeps answering prompts typed on stdin.
serve: venv checkpoint
	$(VENV)/bin/baton generate --model $(MODEL) --stream --interactive "def fibonacci(n):"

bench: venv checkpoint
	$(PY) benchmarks/engine.py --model $(MODEL)

clean:
	rm -rf $(VENV) .cache *.egg-info
