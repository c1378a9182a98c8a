#!/usr/bin/env bash
# On a lent GPU host: the GPU tests, then the kernel benchmark, in one run (< 10 min on an H100).
# Writes its results under $OUT (default benchmarks/results/gpu-check-<date>/).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if ! "$PY" -c "import baton, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  # the host's CUDA torch (not the CPU pin), then the project, the client and the test tools
  "$PY" -m pip install -q torch triton
  "$PY" -m pip install -q ./clients
  "$PY" -m pip install -q --no-deps -e .
  "$PY" -m pip install -q numpy safetensors tokenizers jinja2 xxhash pyzmq ninja pytest transformers tritonclient
fi
# GPU kernels against their references, the engine's CUDA path token-exact with transformers, each
# speculative method on CUDA token-exact with speculation off, INT8 weights and INT8/FP8 KV on CUDA
# against the CPU engine, a vision-language model's images on CUDA against the CPU engine
"$PY" -m pip install -q pillow
"$PY" -m pytest -q tests/test_gpu_kernels.py tests/test_parity.py tests/test_spec_methods.py tests/test_quant.py \
  tests/test_vl.py -k "gpu_kernels or cuda" 2>&1 | tee "$OUT/tests.log"
"$PY" benchmarks/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
echo "results in $OUT"
