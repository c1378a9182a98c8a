"""Turns a scheduled step into one flat model batch, runs it, returns logits for the sequences that
reached the end of their known tokens (those sample a next token; 1 + num_draft rows each). The step's layout is plain lists;
the device's attention backend turns it into the metadata every layer reads."""

from __future__ import annotations

import torch

from baton.kernels.attention_backend import StepLayout, attention_backend

from ..kv.pool import KVPool
from ..models.decoder import DecoderLM
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: DecoderLM, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.block_size = pool.spec.block_size
        self.device = pool.tensor.device
        self.attention = attention_backend(self.device, self.block_size)

    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        bs = self.block_size
        decodes = [(s, n) for s, n in scheduled if n == 1]
        prefills = [(s, n) for s, n in scheduled if n > 1]
        step = StepLayout()
        ids: list[int] = []
        positions: list[int] = []
        for s, _ in decodes:
            p = s.num_computed_tokens
            ids.append(s.token_ids[p])
            positions.append(p)
            step.slot_blocks.append(s.block_table[p // bs])
            step.slot_offsets.append(p % bs)
            step.decode_tables.append(s.block_table)
            step.decode_context_lens.append(p + 1)
        for s, n in prefills:
            p = s.num_computed_tokens
            ids += s.token_ids[p:p + n]
            rng = range(p, p + n)
            positions += rng
            step.slot_blocks += [s.block_table[j // bs] for j in rng]
            step.slot_offsets += [j % bs for j in rng]
            step.prefill_q_lens.append(n)
            step.prefill_prefix_lens.append(p)
            step.prefill_tables.append(s.block_table)

        dev = self.device
        hidden = self.model.forward(torch.tensor(ids, dtype=torch.int64, device=dev),
                                    torch.tensor(positions, dtype=torch.int64, device=dev),
                                    self.attention.build(step), self.pool.layers)

        # the last row of each sequence that reached the end of its known tokens samples; a sequence
        # with drafts gets the rows of its last verified token and of each draft (spec/verifier.py)
        sample_seqs, rows, row = [], [], 0
        for s, n in decodes + prefills:
            row += n
            if s.num_computed_tokens + n == s.num_tokens:
                sample_seqs.append(s)
                rows += range(row - 1 - s.num_draft, row)
        if not sample_seqs:
            return [], None
        every_row = len(rows) == hidden.shape[0]
        logits = self.model.logits(hidden, None if every_row else torch.tensor(rows, device=dev))
        return sample_seqs, logits.cpu()     # sampling (seeded CPU generators) on the host
