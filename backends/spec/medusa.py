"""The Medusa proposer (Cai et al. 2024): head j reads the target's feature at the last verified
position t and guesses token t+j+2; the top-1 of each head, in order, is the draft chain (no tree:
one candidate per position). The heads share the target's lm_head (models/README.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.config import ConfigError
from ..engine.sequence import Sequence
from .config import SpeculativeConfig
from .heads import MedusaHeads
from .proposer import Proposer

if TYPE_CHECKING:
    from ..engine.llm_engine import LLMEngine


class MedusaProposer(Proposer):
    needs_features = True

    def __init__(self, cfg: SpeculativeConfig, engine: LLMEngine) -> None:
        import json
        from pathlib import Path

        meta = json.loads((Path(cfg.model) / "config.json").read_text())
        if "medusa_num_heads" not in meta:
            raise ConfigError(f"speculative.model: {cfg.model} is not a Medusa checkpoint (no medusa_num_heads)")
        tcfg = engine.config
        for key, want in (("hidden_size", tcfg.hidden_size), ("vocab_size", tcfg.vocab_size)):
            if meta.get(key) != want:
                raise ConfigError(f"speculative.model: the heads' {key} {meta.get(key)} differs from the target's {want}")
        if not meta.get("tie_lm_head", False):
            raise ConfigError("speculative.model: Medusa heads with their own lm_head are not supported "
                              "(tie_lm_head must be true)")
        if cfg.num_speculative_tokens > meta["medusa_num_heads"]:
            raise ConfigError(f"speculative.num_speculative_tokens: {cfg.num_speculative_tokens} exceeds the "
                              f"{meta['medusa_num_heads']} Medusa heads")
        self.heads = MedusaHeads.load(cfg.model).to(engine.dtype).to(engine.device).eval()
        self.target = engine.model
        self.head = self.target.head_over(cfg.draft_vocab)
        self.last: dict[int, tuple[int, torch.Tensor]] = {}    # seq_id -> (position, its feature)

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        self.last[seq.seq_id] = (start + features.shape[0] - 1, features[-1].clone())

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        ready = [s for s in seqs if self.last.get(s.seq_id, (-1,))[0] == s.num_tokens - 2]
        if not ready:
            return [[] for _ in seqs]
        feats = torch.stack([self.last[s.seq_id][1] for s in ready])          # [B, h]
        guesses = self.heads.heads[:k]
        h = torch.stack([head(feats) for head in guesses])                    # [k, B, h]
        tokens = self.target.logits(h.reshape(-1, h.shape[-1]), head=self.head).argmax(-1).view(len(guesses), len(ready))
        by_id = {s.seq_id: tokens[:, i].tolist() for i, s in enumerate(ready)}
        return [by_id.get(s.seq_id, []) for s in seqs]

    def forget(self, live: set[int]) -> None:
        for sid in [s for s in self.last if s not in live]:
            del self.last[sid]
