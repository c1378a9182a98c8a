"""Self-distillation data for the Medusa and EAGLE heads: corpus windows continued by the target.

A head's draft is accepted when it guesses what the target will emit given the target's own
previous tokens, so the heads learn from the target's continuations (as Medusa's self-distillation
does), not only from the corpus text the target was trained on. (The draft model learns from them
beside corpus windows of its own: trained on them alone, its agreement with the target on held-out
text fell under the family's 55% goal.) Each
window is a corpus prefix of random length followed by the target's continuation, greedy for most
windows (the case the speculative benchmarks' targets are set for) and sampled at temperature 0.8
for the rest. The continuations are generated with Baton's own engine, in batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from baton import LLM, SamplingParams

PROMPT_TOKENS = (32, 256)     # the corpus prefix's length, uniform in this range
SAMPLED_FRACTION = 0.25       # windows continued at temperature 0.8 (the rest greedily)
BATCH = 64                    # sequences per generate() call


def continued_windows(model: Path, stream: np.ndarray, n: int, length: int, seed: int,
                      threads: int | None = None) -> np.ndarray:
    """n windows of length+1 tokens: a corpus prefix, then the target's continuation of it."""
    rng = np.random.default_rng(seed)
    lo, hi = PROMPT_TOKENS[0], min(PROMPT_TOKENS[1], length // 2)
    starts = rng.integers(0, len(stream) - hi - 1, size=n)
    plens = rng.integers(lo, hi + 1, size=n)
    sampled = rng.random(n) < SAMPLED_FRACTION
    llm = LLM(model, max_num_seqs=BATCH, enable_prefix_caching=False, max_model_len=length + 1,
              **({"threads": threads} if threads else {}))
    out = np.zeros((n, length + 1), dtype=np.int32)
    try:
        for b in range(0, n, BATCH):
            idx = range(b, min(n, b + BATCH))
            prompts = [stream[starts[i]:starts[i] + plens[i]].tolist() for i in idx]
            params = [SamplingParams(temperature=0.8 if sampled[i] else 0.0, seed=seed * 1_000_003 + i,
                                     max_tokens=length + 1 - int(plens[i]), ignore_eos=True) for i in idx]
            for i, o in zip(idx, llm.generate(prompts, params)):
                row = o.prompt_token_ids + o.token_ids
                out[i, :len(row)] = row[:length + 1]
            print(f"[train-tiny] self-distillation windows: {min(n, b + BATCH)}/{n}", flush=True)
    finally:
        llm.close()
    return out


def mixed_batches(distilled: np.ndarray, corpus_batches: Iterator[np.ndarray], batch: int, corpus_per_batch: int,
                  seed: int) -> Iterator[np.ndarray]:
    """Endless batches: batch - corpus_per_batch distilled windows (random, with replacement) and
    corpus_per_batch corpus windows, so the heads still see text the target was trained on."""
    rng = np.random.default_rng(seed)
    while True:
        rows = distilled[rng.integers(0, len(distilled), size=batch - corpus_per_batch)]
        if corpus_per_batch:
            rows = np.concatenate([rows, next(corpus_batches)[:corpus_per_batch]])
        yield rows
