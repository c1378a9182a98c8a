"""The EAGLE proposer (Li et al. 2024, EAGLE-1 chain): the head predicts the target's next feature
from (embedding of token t+1, feature t) with one decoder layer that attends over its own past
entries (a paged KV cache: shadow.py), and the target's lm_head turns each predicted feature into a
draft; k autoregressive steps feed each draft and its predicted feature back in.

Entry t of a sequence's head cache needs the target's real feature t: entries for verified
positions are kept, entries made from predicted features are dropped after each proposal. A
sequence whose early features the engine never saw (its prompt was computed in another process, or
served from the prefix cache) starts its head cache at the first feature seen: rotary positions are
relative, so the head then attends over a shorter past. So does one back from a pause longer than
MAX_CATCH_UP positions (the catch-up would cost more than it buys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from baton.kernels import linear
from baton.kernels.linear import select_linear_method

from ..engine.config import ConfigError
from ..engine.sequence import Sequence
from ..loader.safetensors_loader import load_state_dict
from ..models.config import ModelConfig
from ..models.decoder import DecoderLM, prepare_weights
from .config import SpeculativeConfig
from .draft import shadow_blocks
from .proposer import Proposer
from .shadow import ShadowDecoder

if TYPE_CHECKING:
    from ..engine.llm_engine import LLMEngine


# A sequence that did not draft for a while (the governor paused it) would first feed its head every
# position it skipped; past MAX_CATCH_UP of them the head cache restarts over the last RESTART_WINDOW.
MAX_CATCH_UP = 16
RESTART_WINDOW = 8


class _Features:
    """A sequence's target features not yet turned into head-cache entries."""

    def __init__(self, offset: int) -> None:
        self.offset = offset          # the target position of head-cache entry 0
        self.known = offset           # features seen for positions [offset, known)
        self.pending: list[torch.Tensor] = []


class EagleProposer(Proposer):
    needs_features = True

    def __init__(self, cfg: SpeculativeConfig, engine: LLMEngine) -> None:
        meta = json.loads((Path(cfg.model) / "config.json").read_text())
        tcfg = engine.config
        for key, want in (("hidden_size", tcfg.hidden_size), ("vocab_size", tcfg.vocab_size)):
            if meta.get(key) != want:
                raise ConfigError(f"speculative.model: the head's {key} {meta.get(key)} differs from the target's {want}")
        if tcfg.family != "qwen3":
            raise ConfigError(f"speculative.method: EAGLE heads of a {tcfg.family} target are not supported (qwen3 only)")
        hcfg = ModelConfig.from_hf_dict(dict(meta, architectures=["Qwen3ForCausalLM"], num_hidden_layers=1), {})
        state = load_state_dict(cfg.model, engine.dtype)
        for key in ("fc.weight", "fc.bias"):
            if key not in state:
                raise ConfigError(f"speculative.model: {cfg.model} is not an EAGLE head (no {key!r})")
        fc_w, fc_b = state.pop("fc.weight"), state.pop("fc.bias")
        if tuple(fc_w.shape) != (tcfg.hidden_size, 2 * tcfg.hidden_size):
            raise ConfigError(f"speculative.model: fc.weight has shape {tuple(fc_w.shape)}, expected "
                              f"{(tcfg.hidden_size, 2 * tcfg.hidden_size)}")
        state = {"model." + n: t for n, t in state.items()}
        target = engine.model
        state["model.embed_tokens.weight"] = target.embed             # unused: the head's inputs are embeddings
        state["model.norm.weight"] = torch.ones(tcfg.hidden_size, dtype=engine.dtype)
        weights = prepare_weights(hcfg, state)
        if engine.device.type != "cpu":
            weights = {n: t.to(engine.device) for n, t in weights.items()}
            fc_w, fc_b = fc_w.to(engine.device), fc_b.to(engine.device)
        method = select_linear_method(engine.dtype, engine.device, engine.engine_config.pack_weights)
        self.fc = method.create(method.process(fc_w), fc_b)
        k = cfg.num_speculative_tokens
        model = DecoderLM(hcfg, weights, engine.max_model_len + k + 1, method, final_norm=False)
        self.dec = ShadowDecoder(model, shadow_blocks(engine.block_manager.num_blocks, engine.engine_config.max_num_seqs,
                                                      engine.block_size, k), engine.block_size, engine.dtype, engine.device)
        self.target = target
        self.head = target.head_over(cfg.draft_vocab)
        self.feats: dict[int, _Features] = {}

    def observe(self, seq: Sequence, start: int, features: torch.Tensor) -> None:
        st = self.feats.get(seq.seq_id)
        if st is None or start > st.known:         # first features, or a gap: start the head cache here
            self.dec.drop(seq.seq_id)
            st = self.feats[seq.seq_id] = _Features(start)
        features = features[st.known - start:]     # a recompute (preemption) repeats positions already seen
        if features.shape[0]:
            st.pending.append(features.clone())
            st.known += features.shape[0]

    def _embed(self, tokens: list[int], features: torch.Tensor) -> torch.Tensor:
        e = F.embedding(torch.tensor(tokens, device=features.device), self.target.embed)
        return linear(torch.cat([e, features.to(e.dtype)], -1), self.fc)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int) -> list[list[int]]:
        dec = self.dec
        items, out = [], {}
        for s in seqs:
            st = self.feats.get(s.seq_id)
            m = s.num_tokens - 1                   # position of the last verified token (no feature yet)
            if st is None or st.known != m or not st.pending:
                continue
            if sum(f.shape[0] for f in st.pending) > MAX_CATCH_UP:   # back from a pause: restart the head cache
                recent = torch.cat(st.pending)[-RESTART_WINDOW:]      # over the latest positions only
                dec.drop(s.seq_id)
                st = self.feats[s.seq_id] = _Features(st.known - recent.shape[0])
                st.known, st.pending = st.offset + recent.shape[0], [recent]
            sh = dec.shadow(s.seq_id)
            first = st.known - sum(f.shape[0] for f in st.pending)    # target position of the first new entry
            dec.truncate(sh, first - st.offset)    # entries past it were made from predicted features
            if not dec.reserve(sh, m - st.offset + k - 1):
                continue
            feats = torch.cat(st.pending) if len(st.pending) > 1 else st.pending[0]
            st.pending = []
            items.append((s.seq_id, sh, s.token_ids[first + 1:m + 1], feats))
            out[s.seq_id] = []
        if not items:
            return [[] for _ in seqs]
        feed = [(sh, toks) for _, sh, toks, _ in items]
        embeds = torch.cat([self._embed(toks, f) for _, _, toks, f in items])
        for j in range(k):
            predicted = dec.extend(feed, embeds)                       # [B, h]: features of the next positions
            drafts = self.target.logits(predicted, head=self.head).argmax(-1).tolist()
            for (sid, _, _, _), d in zip(items, drafts):
                out[sid].append(d)
            if j < k - 1:
                feed = [(sh, [d]) for (_, sh, _, _), d in zip(items, drafts)]
                embeds = self._embed(drafts, predicted)
        return [out.get(s.seq_id, []) for s in seqs]

    def forget(self, live: set[int]) -> None:
        for sid in [s for s in self.feats if s not in live]:
            del self.feats[sid]
        self.dec.forget(live)

    def close(self) -> None:
        self.dec.close()
