"""Teacher-forced scoring: the engine's logits for every position of a token sequence, through the
same model, weight method and KV cache dtype that serve requests. Quality checks (benchmarks/quant.py,
the quantization tests) read perplexity and top-1 agreement from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .llm_engine import LLMEngine


@dataclass
class _Window:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


@torch.inference_mode()
def window_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [len(token_ids), vocab]: row i predicts token i + 1. Runs as one prefill on
    blocks borrowed from the engine's pool (returned after; the engine must be idle)."""
    w = _Window(list(token_ids))
    n_blocks = -(-len(token_ids) // engine.block_size)
    w.block_table = engine.block_manager.allocate(n_blocks)
    try:
        _, hidden = engine.runner.forward([(w, len(token_ids))])
        return engine.model.logits(hidden).cpu()
    finally:
        engine.block_manager.release(w.block_table)


@dataclass
class Score:
    nll: float                     # summed negative log-likelihood of the predicted tokens
    tokens: int
    argmax: torch.Tensor           # the top-1 prediction at each position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def score(engine: LLMEngine, windows: list[list[int]]) -> Score:
    """Perplexity of each window's tokens 1.. given the ones before, over all windows."""
    nll, n, argmax = 0.0, 0, []
    for ids in windows:
        logits = window_logits(engine, ids[:-1])
        target = torch.tensor(ids[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        n += len(target)
        argmax.append(logits.argmax(-1))
    return Score(nll, n, torch.cat(argmax))
