"""Proposers: up to k draft tokens per decoding sequence, scored by one target forward (engine) and
accepted or rejected by the verifier (spec/verifier.py). Every method here proposes its most likely
tokens (one-hot drafts: the verifier's q is a point mass, which keeps sampling lossless); a proposer
that sampled its drafts would return their probabilities from `draft_probs`.

The engine tells a proposer what the target verified: `observe` gets the target's final hidden
states ("features", what its lm_head reads) of each newly verified position, for the methods that
read them (Medusa, EAGLE); `forget` lists the sequences still alive, so per-sequence state (a draft
model's KV) is freed when a request ends however it ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.sequence import Sequence
from .config import SpeculativeConfig

if TYPE_CHECKING:
    from ..engine.llm_engine import LLMEngine


class Proposer:
    needs_features = False        # observe() is called only for proposers that read features

    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        """Draft tokens for each sequence (possibly none), at most k each."""
        raise NotImplementedError

    def draft_probs(self) -> list[torch.Tensor | None] | None:
        """The last proposal's probabilities per sequence ([len(draft), vocab]), or None: one-hot."""
        return None

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        """The target's features of seq's verified positions start, start+1, ..."""

    def forget(self, live: set[int]) -> None:
        """Drop the state of sequences whose seq_id is not in `live`."""

    def close(self) -> None:
        pass


class NgramProposer(Proposer):
    """Prompt lookup (Saxena 2023; vLLM's ngram proposer): find the latest earlier occurrence of the
    sequence's last n tokens (n from n_max down to n_min) in its prompt and output, and propose the
    tokens that followed it. Costs no model call; pays off on text that repeats its context (code,
    edits, summaries)."""

    def __init__(self, n_max: int = 3, n_min: int = 1) -> None:
        self.n_max, self.n_min = n_max, n_min

    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        return [self._one(s.token_ids, k) for s in seqs]

    def _one(self, ids: list[int], k: int) -> list[int]:
        n_tokens = len(ids)
        for n in range(min(self.n_max, n_tokens - 1), self.n_min - 1, -1):
            tail = ids[-n:]
            # latest match first: recent context predicts best
            for start in range(n_tokens - n - 1, -1, -1):
                if ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    if follow:
                        return follow
        return []


def make_proposer(cfg: SpeculativeConfig, engine: LLMEngine) -> Proposer:
    """The configured method's proposer for `engine`'s target model (checked against it)."""
    if cfg.method == "ngram":
        return NgramProposer(cfg.prompt_lookup_max, cfg.prompt_lookup_min)
    if cfg.method == "draft":
        from .draft import DraftModelProposer

        return DraftModelProposer.for_engine(cfg, engine)
    if cfg.method == "medusa":
        from .medusa import MedusaProposer

        return MedusaProposer(cfg, engine)
    from .eagle import EagleProposer

    return EagleProposer(cfg, engine)
