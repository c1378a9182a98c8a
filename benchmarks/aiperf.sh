#!/usr/bin/env bash
# NVIDIA's aiperf (OpenAI endpoints) against a running node's OpenAI gateway (`make serve`, :9000).
# aiperf is heavy (dash, pandas, plotly, datasets), so it gets its own venv in .cache/aiperf-venv.
#
#   benchmarks/aiperf.sh                      # streaming /v1/completions, 4 concurrent, 64 requests
#   CONCURRENCY=8 REQUESTS=128 ISL=256 OSL=128 ENDPOINT=chat benchmarks/aiperf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
URL=${URL:-http://127.0.0.1:9000}
MODEL=${MODEL:-baton-tiny}                 # the gateway's model name: the checkpoint's folder name
TOKENIZER=${TOKENIZER:-models/$MODEL}      # aiperf sizes its synthetic prompts with it
CONCURRENCY=${CONCURRENCY:-4}
REQUESTS=${REQUESTS:-64}
ISL=${ISL:-128}
OSL=${OSL:-64}
ENDPOINT=${ENDPOINT:-completions}          # or chat
OUT=${OUT:-.cache/aiperf-results/$MODEL-c$CONCURRENCY}   # summaries worth keeping go to benchmarks/results/aiperf/
VENV=.cache/aiperf-venv
if [ ! -x "$VENV/bin/aiperf" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q aiperf
fi
"$VENV/bin/aiperf" profile -m "$MODEL" --url "$URL" --endpoint-type "$ENDPOINT" --streaming \
  --concurrency "$CONCURRENCY" --request-count "$REQUESTS" --warmup-request-count 4 \
  --prompt-input-tokens-mean "$ISL" --prompt-output-tokens-mean "$OSL" --tokenizer "$TOKENIZER" \
  --random-seed 0 --ui-type none --output-artifact-dir "$OUT"
