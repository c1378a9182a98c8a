"""The Medusa proposer (Cai et al. 2024): head j reads the target's feature at the last verified
position t and guesses token t+j+2; the top-1 of each head, in order, is the draft chain (no tree:
one candidate per position; docs/spec.md says why). The heads share the target's lm_head
(models/README.md).

The heads' first residual blocks all read the same feature, so their k weights run as one stacked
GEMM (the engine's linear kernel), then one lm_head GEMM over the k rows: a proposal is two GEMMs,
not 3k + 1 small ops. Head by head it cost ~0.8 ms a step on this CPU, half a plain decode step,
which kept drafting below break-even."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from baton.kernels.linear import LinearWeight, linear

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
        heads = MedusaHeads.load(cfg.model).to(engine.dtype).to(engine.device).eval()
        k = cfg.num_speculative_tokens
        blocks = [[b.linear for b in head] for head in heads.heads[:k]]          # [head][layer]
        # layer 0 of the k heads reads the same feature: one [k*h, h] weight
        self.first = LinearWeight(torch.cat([b[0].weight for b in blocks]).detach(),
                                  torch.cat([b[0].bias for b in blocks]).detach(), pack=engine.engine_config.pack_weights)
        self.rest = [[LinearWeight(lin.weight.detach(), lin.bias.detach(), pack=engine.engine_config.pack_weights)
                      for lin in b[1:]] for b in blocks]
        self.k = k
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
        B, hidden = feats.shape
        # x + SiLU(W x + b) per head and residual block; rows [B, k]
        x = feats[:, None, :] + F.silu(linear(feats, self.first)).view(B, self.k, hidden)
        if any(self.rest):
            x = torch.stack([self._rest(x[:, j], j) for j in range(self.k)], 1)
        tokens = self.target.logits(x.reshape(B * self.k, hidden), head=self.head).argmax(-1).view(B, self.k)
        by_id = {s.seq_id: row[:k] for s, row in zip(ready, tokens.tolist())}
        return [by_id.get(s.seq_id, []) for s in seqs]

    def _rest(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Head j's residual blocks after the first (medusa_num_layers > 1)."""
        for lin in self.rest[j]:
            x = x + F.silu(linear(x, lin))
        return x

    def forget(self, live: set[int]) -> None:
        for sid in [s for s in self.last if s not in live]:
            del self.last[sid]
