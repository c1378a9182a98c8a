# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv
# from this project's own files (torch pinned to the CPU build that installs from a local wheel).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  ?= models/baton-tiny
BENCH_MODEL ?= .cache/checkpoints/small

.PHONY: venv sysdeps testdeps apt tools loadtest test lint serve smoke bench checkpoint models clean

$(VENV)/.installed: pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ./clients
	$(PY) -m pip install -q -e ".[test]"
	# tritonserver 2.51 + Python backend from this wheel; its Python deps are not needed
	$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

venv: $(VENV)/.installed

# System packages: libb64-0d for NVIDIA's perf_analyzer (tests drive the server with it); etcd-server
# (the PD name service) and libibverbs1 (the Mooncake transfer engine loads it even for tcp);
# iproute2 (the PD tests' simulated hosts). Installed with apt-get when root, else named.
# redis-server: the KV tiers' Redis store (L4; started by baton serve or the tests, never assumed).
# docker-compose (tests only): validates docker/'s compose files without a Docker engine.
SYSPKGS := libb64-0d etcd-server libibverbs1 iproute2 redis-server
TEST_SYSPKGS := docker-compose
sysdeps:
	@$(MAKE) -s apt PKGS="$(SYSPKGS)"

testdeps:
	@$(MAKE) -s apt PKGS="$(TEST_SYSPKGS)"

apt:
	@missing=$$(for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q $$missing >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null); \
	  else echo "make: please install these Debian packages: $$missing (sudo apt-get install $$missing)"; exit 1; fi; \
	fi

# NVIDIA's perf_analyzer 2.51 (the last build that runs on glibc 2.36) and the libcudart it links,
# unpacked from their PyPI wheels into .cache/tools (not installed: tritonclient stays current).
PERF_ANALYZER := .cache/tools/perf_analyzer
$(PERF_ANALYZER): | venv
	$(PY) -m baton.tools.fetch_perf_analyzer .cache/tools

tools: $(PERF_ANALYZER)

# ruff, and pyright for one thing: that every import resolves statically (baton.*, baton_client)
lint: venv
	$(PY) -m ruff check .
	$(VENV)/bin/pyright

test: venv sysdeps testdeps tools lint
	$(VENV)/bin/pytest

# The default model is committed (models/, trained by `make models`); random-init checkpoints of
# larger shapes for benchmarks are made on demand.
models/baton-tiny/config.json: | venv
	$(VENV)/bin/baton train-tiny --out models

.cache/checkpoints/%/config.json: | venv
	$(VENV)/bin/baton make-checkpoint $* --out .cache/checkpoints/$*

checkpoint: $(MODEL)/config.json

# Retrain the baton-tiny family from the stdlib sources (~90 min on 2 cores); rewrites models/.
models: venv
	$(VENV)/bin/baton train-tiny --out models

# Serves the default model through tritonserver (the llm front over preprocess -> prefill -> decode)
# and the OpenAI gateway (:9000), streams a sample completion, then keeps serving until Ctrl-C.
serve: venv sysdeps checkpoint
	$(VENV)/bin/baton serve --model $(MODEL) --prompt "def fibonacci(n):"

# Starts a server, streams a completion, checks it against the in-process engine, stops.
smoke: venv checkpoint
	$(VENV)/bin/baton serve --model $(MODEL) --smoke --http-port 0 --grpc-port 0 --metrics-port 0 --gateway-port 0

bench: venv $(BENCH_MODEL)/config.json
	$(PY) benchmarks/engine.py --model $(BENCH_MODEL)

# Load test against a running node (`make serve` in another shell): locust headless for TIME with
# USERS users streaming over Triton gRPC and through the OpenAI gateway; writes locust's HTML report,
# its CSVs and PNG plots (TTFT/TPOT percentiles, tokens/s over time) to LOADTEST_DIR.
TRITON ?= 127.0.0.1:8001
OPENAI ?= http://127.0.0.1:9000
MODEL_NAME ?= baton-tiny
USERS ?= 8
TIME ?= 60s
MAX_TOKENS ?= 64
LOADTEST_DIR ?= loadtest-results
loadtest: venv
	mkdir -p $(LOADTEST_DIR)
	$(VENV)/bin/locust -f clients/locustfile.py --headless -u $(USERS) -r $(USERS) -t $(TIME) --only-summary \
	    --triton $(TRITON) --host $(OPENAI) --model-name $(MODEL_NAME) --max-tokens $(MAX_TOKENS) \
	    --csv $(LOADTEST_DIR)/run --csv-full-history --html $(LOADTEST_DIR)/report.html
	$(PY) clients/loadtest_plots.py $(LOADTEST_DIR)/run

clean:
	rm -rf $(VENV) .cache *.egg-info
