"""Proposers: up to k draft tokens per running sequence, scored by one target forward (engine) and
accepted or rejected by the verifier (spec/verifier.py). A proposer that samples also returns its
draft probabilities; one that does not (prompt lookup) proposes one-hot drafts."""

from __future__ import annotations

from typing import Protocol

import torch

from ..engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        """Draft tokens for each sequence (possibly none), at most k each."""
        ...

    def draft_probs(self) -> list[torch.Tensor | None] | None:
        """The last proposal's probabilities per sequence ([len(draft), vocab]), or None: one-hot."""
        ...


class NgramProposer:
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

    def draft_probs(self) -> None:
        return None
