#!/usr/bin/env bash
# NVIDIA's genai-perf against a running node's Triton endpoint, as TensorRT-LLM- and vLLM-backend
# users run it. NOT RUN HERE: genai-perf needs perf_analyzer >= 2.52, which needs glibc 2.38 (this
# project's CI machines have 2.36). Run it on a GPU host, e.g. inside NVIDIA's SDK container:
#   docker run --net host -v $PWD:/w -w /w nvcr.io/nvidia/tritonserver:24.10-py3-sdk benchmarks/genai_perf.sh
set -euo pipefail
URL=${URL:-127.0.0.1:8001}
TOKENIZER=${TOKENIZER:-models/baton-tiny}
CONCURRENCY=${CONCURRENCY:-4}
for backend in tensorrtllm vllm; do
  genai-perf profile -m llm --service-kind triton --backend "$backend" -u "$URL" --streaming \
    --synthetic-input-tokens-mean 128 --output-tokens-mean 64 --concurrency "$CONCURRENCY" \
    --tokenizer "$TOKENIZER" --artifact-dir "benchmarks/results/genai-perf-$backend"
done
