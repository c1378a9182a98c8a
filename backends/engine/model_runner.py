"""Turns a scheduled step into one flat model batch, runs it, returns logits for the sequences that
reached the end of their known tokens (those sample a next token; 1 + num_draft rows each). The step's layout is plain lists;
the device's attention backend turns it into the metadata every layer reads."""

from __future__ import annotations

from typing import Protocol

import torch

from baton.kernels.attention_backend import StepLayout, attention_backend

from ..kv.pool import KVPool
from ..models.decoder import DecoderLM
from ..models.lora import LoRAAdapter, LoRABatch
from .sequence import Sequence


class Paged(Protocol):
    """What a step's layout reads of a sequence (a Sequence, or a draft model's shadow of one)."""
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]


# Chunks of at most this many tokens run as that many decode rows (row j attends to the context up
# to itself): a verify step's k+1 rows, or a short prompt, then take the decode kernels (on CPU the
# fused one-call decode step) instead of the prefill path. All K/V of a layer is stored before any
# row attends, so the rows see each other causally.
DECODE_ROWS = 8


def layout_step(scheduled: list[tuple[Paged, int]], block_size: int) -> tuple[list, list[int], list[int], StepLayout]:
    """The step's rows in flat-batch order (short chunks as decode rows first, then longer chunks):
    the sequences in that order, token ids, positions and the attention layout."""
    bs = block_size
    # short chunks first; within each kind, the requests of one LoRA adapter together (one run of
    # rows each: models/lora.py then slices instead of gathering). Stable: without adapters, as scheduled
    order = sorted(scheduled, key=lambda x: (x[1] > DECODE_ROWS, getattr(x[0], "lora", "")))
    step = StepLayout()
    ids: list[int] = []
    positions: list[int] = []
    for s, n in order:
        p = s.num_computed_tokens
        ids += s.token_ids[p:p + n]
        rng = range(p, p + n)
        positions += rng
        step.slot_blocks += [s.block_table[j // bs] for j in rng]
        step.slot_offsets += [j % bs for j in rng]
        if n <= DECODE_ROWS:
            for j in rng:
                step.decode_tables.append(s.block_table)
                step.decode_context_lens.append(j + 1)
        else:
            step.prefill_q_lens.append(n)
            step.prefill_prefix_lens.append(p)
            step.prefill_tables.append(s.block_table)
    return order, ids, positions, step


class ModelRunner:
    def __init__(self, model: DecoderLM, pool: KVPool, loras: dict[str, LoRAAdapter] | None = None) -> None:
        self.model = model
        self.loras = loras or {}                      # by name: what a sequence's `lora` names
        self.pool = pool
        self.block_size = pool.spec.block_size
        self.device = pool.tensor.device
        self.attention = attention_backend(self.device, self.block_size)
        self.hidden: torch.Tensor | None = None      # the last step's final hidden states (a proposer's features)
        self.row_of: dict[int, int] = {}              # seq_id -> its first row in `hidden`

    def forward(self, scheduled: list[tuple[Paged, int]], inputs_embeds: torch.Tensor | None = None
                ) -> tuple[list[tuple[Paged, int]], torch.Tensor]:
        """One forward over the scheduled tokens (or their embeddings, given in the same order as
        `layout_step` puts them): the order of the rows and the hidden states."""
        order, ids, positions, step = layout_step(scheduled, self.block_size)
        dev = self.device
        mm_rows = [(s, n) for s, n in order if getattr(s, "mm", None) is not None]
        if mm_rows and all(s.num_computed_tokens >= s.mm.positions.shape[1] for s, _ in mm_rows):
            # only generated (text) tokens of image prompts: their three M-RoPE positions agree, so
            # plain positions shifted by each one's delta (the fused decode step, no per-step tables)
            row = 0
            for s, n in order:
                if getattr(s, "mm", None) is not None:
                    positions[row:row + n] = [x + s.mm.delta for x in positions[row:row + n]]
                row += n
            mm_rows = []
        pos = torch.tensor(positions, dtype=torch.int64)
        if mm_rows:
            pos, inputs_embeds = self._multimodal(order, ids, pos, inputs_embeds)
        lora = None
        if self.loras and any(getattr(s, "lora", "") for s, _ in order):
            lora = LoRABatch.of([self.loras[s.lora] if getattr(s, "lora", "") else None
                                 for s, n in order for _ in range(n)], dev)
        hidden = self.model.forward(None if inputs_embeds is not None else torch.tensor(ids, dtype=torch.int64, device=dev),
                                    pos.to(dev), self.attention.build(step), self.pool.layers, inputs_embeds, lora)
        return order, hidden

    def _multimodal(self, order: list[tuple[Paged, int]], ids: list[int], pos: torch.Tensor,
                    inputs_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A step with images' sequences in it: [3, T] M-RoPE positions, and the token embeddings
        with each image's embeddings at its placeholders (where this step computes them)."""
        pos3, row = pos.expand(3, -1).clone(), 0
        for s, n in order:
            mm, p = getattr(s, "mm", None), s.num_computed_tokens
            if mm is not None:
                pos3[:, row:row + n] = mm.position_rows(p, p + n)
                for i, span in enumerate(mm.spans):
                    a, b = max(span.start, p), min(span.start + span.length, p + n)
                    if a >= b:
                        continue
                    emb = mm.embedding(i)
                    if emb is None:               # LLMEngine._drop_unencoded keeps these out of a step
                        raise RuntimeError(f"image {span.hash}: no embeddings")
                    if inputs_embeds is None:
                        inputs_embeds = torch.nn.functional.embedding(
                            torch.tensor(ids, dtype=torch.int64, device=self.device), self.model.embed)
                    inputs_embeds[row + a - p:row + b - p] = emb[a - span.start:b - span.start]
            row += n
        return pos3, inputs_embeds

    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        order, hidden = self.forward(scheduled)
        self.hidden = hidden
        # the last row of each sequence that reached the end of its known tokens samples; a sequence
        # with drafts gets the rows of its last verified token and of each draft (spec/verifier.py)
        sample_seqs, rows, row = [], [], 0
        self.row_of = {}
        for s, n in order:
            self.row_of[s.seq_id] = row
            row += n
            if s.num_computed_tokens + n == s.num_tokens:
                sample_seqs.append(s)
                rows += range(row - 1 - s.num_draft, row)
        if not sample_seqs:
            return [], None
        every_row = len(rows) == hidden.shape[0]
        logits = self.model.logits(hidden, None if every_row else torch.tensor(rows, device=self.device))
        return sample_seqs, logits.cpu()     # sampling (seeded CPU generators) on the host
