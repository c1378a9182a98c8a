"""Turns a scheduled step into one flat model batch, runs it, returns logits for the sequences that
reached the end of their known tokens (those sample a next token)."""

from __future__ import annotations

import torch

from baton.kernels import AttentionBatch, DecodeMeta, PrefillMeta

from ..kv.pool import KVPool
from ..models.decoder import DecoderLM
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: DecoderLM, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.block_size = pool.spec.block_size
        self.device = pool.tensor.device

    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        bs = self.block_size
        decodes = [(s, n) for s, n in scheduled if n == 1]
        prefills = [(s, n) for s, n in scheduled if n > 1]
        ids: list[int] = []
        slot_b: list[int] = []
        slot_o: list[int] = []
        positions: list[int] = []
        for s, _ in decodes:
            p = s.num_computed_tokens
            ids.append(s.token_ids[p])
            positions.append(p)
            slot_b.append(s.block_table[p // bs])
            slot_o.append(p % bs)
        q_starts, q_lens, prefix_lens = [], [], []
        for s, n in prefills:
            p = s.num_computed_tokens
            q_starts.append(len(ids) - len(decodes))
            q_lens.append(n)
            prefix_lens.append(p)
            ids += s.token_ids[p:p + n]
            rng = range(p, p + n)
            positions += rng
            slot_b += [s.block_table[j // bs] for j in rng]
            slot_o += [j % bs for j in rng]

        dev = self.device
        decode = None
        if decodes:
            decode = DecodeMeta.build([s.block_table for s, _ in decodes],
                                      [s.num_computed_tokens + 1 for s, _ in decodes], bs)
            if dev.type != "cpu":
                decode.block_tables, decode.context_lens = decode.block_tables.to(dev), decode.context_lens.to(dev)
        batch = AttentionBatch(
            num_decode=len(decodes),
            decode=decode,
            prefill=PrefillMeta.build(q_starts, q_lens, prefix_lens, [s.block_table for s, _ in prefills], bs)
            if prefills else None,
            slot_blocks=torch.tensor(slot_b, dtype=torch.int64, device=dev),
            slot_offsets=torch.tensor(slot_o, dtype=torch.int64, device=dev),
        )
        hidden = self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev),
                                    torch.tensor(positions, dtype=torch.int64, device=dev), batch, self.pool.layers)

        sample_seqs, rows, row = [], [], 0
        for s, n in decodes + prefills:
            row += n
            if s.num_computed_tokens + n == s.num_tokens:
                sample_seqs.append(s)
                rows.append(row - 1)
        if not sample_seqs:
            return [], None
        h = hidden if len(rows) == hidden.shape[0] else hidden[torch.tensor(rows, device=dev)]
        return sample_seqs, self.model.logits(h).cpu()     # sampling (seeded CPU generators) on the host
