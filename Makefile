# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv
# from this project's own files (torch pinned to the CPU build that installs from a local wheel).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  ?= .cache/checkpoints/small
PRESET ?= small

.PHONY: venv test lint serve smoke bench checkpoint clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# tritonserver 2.51 + Python backend from this wheel; its Python deps are not needed
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest

$(MODEL)/config.json: | venv
	$(VENV)/bin/baton make-checkpoint $(PRESET) --out $(MODEL)

checkpoint: $(MODEL)/config.json

# Serves the default model through tritonserver (prefill -> decode ensemble), streams a sample
# completion, then keeps serving until Ctrl-C.
serve: venv checkpoint
	$(VENV)/bin/baton serve --model $(MODEL) --prompt "def fibonacci(n):"

# Starts a server, streams a completion, checks it against the in-process engine, stops.
smoke: venv checkpoint
	$(VENV)/bin/baton serve --model $(MODEL) --smoke --http-port 0 --grpc-port 0 --metrics-port 0

bench: venv checkpoint
	$(PY) benchmarks/engine.py --model $(MODEL)

clean:
	rm -rf $(VENV) .cache *.egg-info
