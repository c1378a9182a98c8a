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


def shadow_blocks(target_blocks: int, max_num_seqs: int, block_size: int, k: int) -> int:
    """Blocks for every position the target's pool can hold, plus k drafts per sequence."""
    return target_blocks + max_num_seqs * (-(-(k + 1) // block_size) + 1)


class DraftModelProposer(Proposer):
    def __init__(self, cfg: SpeculativeConfig, vocab_size: int, dtype: torch.dtype, device: torch.device,
                 block_size: int, max_model_len: int, num_blocks: int, pack_weights: bool = True) -> None:
        """The draft model of `cfg` for a target of `vocab_size`, its KV in `num_blocks` blocks."""
        try:
            dcfg = ModelConfig.from_dir(cfg.model)
        except ValueError as e:
            raise ConfigError(f"speculative.model: {e}") from None
        if dcfg.vocab_size != vocab_size:
            raise ConfigError(f"speculative.model: the draft's vocab_size {dcfg.vocab_size} differs from the "
                              f"target's {vocab_size}")
        k = cfg.num_speculative_tokens
        weights = prepare_weights(dcfg, load_state_dict(cfg.model, dtype))
        if device.type != "cpu":
            weights = {n: t.to(device) for n, t in weights.items()}
        model = DecoderLM(dcfg, weights, max_model_len + k + 1, select_linear_method(dtype, device, pack_weights))
        self.dec = ShadowDecoder(model, num_blocks, block_size, dtype, device)
        self.head = model.head_over(cfg.draft_vocab)

    @classmethod
    def for_engine(cls, cfg: SpeculativeConfig, engine: LLMEngine) -> DraftModelProposer:
        return cls(cfg, engine.config.vocab_size, engine.dtype, engine.device, engine.block_size,
                   engine.max_model_len, shadow_blocks(engine.block_manager.num_blocks, engine.engine_config.max_num_seqs,
                                                       engine.block_size, cfg.num_speculative_tokens),
                   engine.engine_config.pack_weights)

    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        items = []
        for s in seqs:
            start = self.dec.shadow(s.seq_id).synced
            items.append((s.seq_id, start, s.token_ids[start:]))
        return [d or [] for d in self.draft(items, k)]

    @torch.inference_mode()
    def draft(self, items: list[tuple[int, int, list[int]]], k: int) -> list[list[int] | None]:
        """Drafts for (key, start, verified tokens from position `start` on) items; None for a key
        whose shadow holds fewer than `start` tokens (the caller must resend from its `synced`)."""
        dec = self.dec
        live, out = [], [None] * len(items)
        for i, (key, start, tokens) in enumerate(items):
            sh = dec.shadow(key)
            if sh.synced < start or not tokens:
                continue
            # the inputs past `start` may be drafts: keep the ones the target accepted; always feed
            # the last verified token again at least (its row predicts the first draft)
            keep = start
            for a, b in zip(sh.token_ids[start:], tokens):
                if a != b:
                    break
                keep += 1
            total = start + len(tokens)
            keep = min(keep, total - 1)
            dec.truncate(sh, keep)
            out[i] = []
            if not dec.reserve(sh, total + k - 1):
                continue                          # the shadow pool is full: no drafts this step
            sh.synced = total
            live.append((i, sh, tokens[keep - start:]))
        feed = [(sh, new) for _, sh, new in live]
        for _ in range(k):
            if not feed:
                break
            drafts = dec.model.logits(dec.extend(feed), head=self.head).argmax(-1).tolist()
            for (i, _, _), d in zip(live, drafts):
                out[i].append(d)
            feed = [(sh, [d]) for (_, sh, _), d in zip(live, drafts)]
        return out

    def synced(self, key: int) -> int:
        sh = self.dec.shadows.get(key)
        return sh.synced if sh is not None else 0

    def forget(self, live: set[int]) -> None:
        self.dec.forget(live)

    def release(self, keys: list[int]) -> None:
        for key in keys:
            self.dec.drop(key)

    def close(self) -> None:
        self.dec.close()
