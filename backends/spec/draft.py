"""The draft-model proposer: a small model of the target's tokenizer (models/baton-tiny-draft)
decodes k tokens greedily after each sequence's verified tokens, on its own paged KV (shadow.py).
One forward per draft position for the whole batch: the first also catches each sequence up on the
tokens the target verified since its last proposal (the prompt, the first time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from baton.kernels.linear import select_linear_method

from ..engine.config import ConfigError
from ..engine.sequence import Sequence
from ..loader.safetensors_loader import load_state_dict
from ..models.config import ModelConfig
from ..models.decoder import DecoderLM, prepare_weights
from .config import SpeculativeConfig
from .proposer import Proposer
from .shadow import ShadowDecoder

if TYPE_CHECKING:
    from ..engine.llm_engine import LLMEngine


def shadow_blocks(engine: LLMEngine, k: int) -> int:
    """Blocks for every position the target's pool can hold, plus k drafts per sequence."""
    bs = engine.block_size
    return engine.block_manager.num_blocks + engine.engine_config.max_num_seqs * (-(-(k + 1) // bs) + 1)


class DraftModelProposer(Proposer):
    def __init__(self, cfg: SpeculativeConfig, engine: LLMEngine) -> None:
        try:
            dcfg = ModelConfig.from_dir(cfg.model)
        except ValueError as e:
            raise ConfigError(f"speculative.model: {e}") from None
        if dcfg.vocab_size != engine.config.vocab_size:
            raise ConfigError(f"speculative.model: the draft's vocab_size {dcfg.vocab_size} differs from the "
                              f"target's {engine.config.vocab_size}")
        k = cfg.num_speculative_tokens
        weights = prepare_weights(dcfg, load_state_dict(cfg.model, engine.dtype))
        if engine.device.type != "cpu":
            weights = {n: t.to(engine.device) for n, t in weights.items()}
        method = select_linear_method(engine.dtype, engine.device, engine.engine_config.pack_weights)
        model = DecoderLM(dcfg, weights, engine.max_model_len + k + 1, method)
        self.dec = ShadowDecoder(model, shadow_blocks(engine, k), engine.block_size, engine.dtype, engine.device)

    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        dec = self.dec
        items, out = [], {}
        for s in seqs:
            sh = dec.shadow(s.seq_id)
            verified = s.token_ids
            # the inputs past `synced` were drafts: keep the ones the target accepted; always feed
            # the last verified token again at least (its row predicts the first draft)
            keep = sh.synced
            for a, b in zip(sh.token_ids[keep:], verified[keep:]):
                if a != b:
                    break
                keep += 1
            keep = min(keep, len(verified) - 1)
            dec.truncate(sh, keep)
            if not dec.reserve(sh, len(verified) + k - 1):
                continue                          # the shadow pool is full: no drafts this step
            sh.synced = len(verified)
            items.append((s.seq_id, sh, verified[keep:]))
            out[s.seq_id] = []
        feed = [(sh, new) for _, sh, new in items]
        for j in range(k):
            if not feed:
                break
            hidden = dec.extend(feed)
            drafts = dec.model.logits(hidden).argmax(-1).tolist()
            for (sid, _, _), d in zip(items, drafts):
                out[sid].append(d)
            if j < k - 1:
                feed = [(sh, [d]) for (_, sh, _), d in zip(items, drafts)]
        return [out.get(s.seq_id, []) for s in seqs]

    def forget(self, live: set[int]) -> None:
        self.dec.forget(live)

    def close(self) -> None:
        self.dec.close()
