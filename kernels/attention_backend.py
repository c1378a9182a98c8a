"""The attention backend of a device: builds one step's attention metadata once, in the form that
device's kernels read (block tables, context lengths, query spans, the slots new K/V go to); every
layer then only reads it. The model runner describes the step in plain lists (StepLayout) and never
touches a device tensor of attention metadata itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import AttentionBatch, DecodeMeta, PrefillMeta, cuda_prefill_meta


@dataclass
class StepLayout:
    """A step's rows in flat-batch order: single-token decode rows first, then prefill chunks."""

    decode_tables: list[list[int]] = field(default_factory=list)
    decode_context_lens: list[int] = field(default_factory=list)   # tokens of context incl. the new one
    prefill_q_lens: list[int] = field(default_factory=list)
    prefill_prefix_lens: list[int] = field(default_factory=list)   # tokens already in the cache before the chunk
    prefill_tables: list[list[int]] = field(default_factory=list)
    slot_blocks: list[int] = field(default_factory=list)           # where each row's new K/V goes
    slot_offsets: list[int] = field(default_factory=list)


class AttentionBackend:
    """CPU: metadata stays on the host, where the fused C++ kernels (or the torch paths) read it."""

    def __init__(self, device: torch.device, block_size: int) -> None:
        self.device = device
        self.block_size = block_size

    def build(self, step: StepLayout) -> AttentionBatch:
        decode = prefill = None
        if step.decode_tables:
            decode = DecodeMeta.build(step.decode_tables, step.decode_context_lens, self.block_size)
        if step.prefill_tables:
            starts, row = [], 0
            for n in step.prefill_q_lens:
                starts.append(row)
                row += n
            prefill = PrefillMeta.build(starts, step.prefill_q_lens, step.prefill_prefix_lens, step.prefill_tables,
                                        self.block_size)
        return AttentionBatch(num_decode=len(step.decode_tables), decode=decode, prefill=prefill,
                              slot_blocks=torch.tensor(step.slot_blocks, dtype=torch.int64),
                              slot_offsets=torch.tensor(step.slot_offsets, dtype=torch.int64))


class CudaAttentionBackend(AttentionBackend):
    """CUDA: the same metadata moved to the device once per step, with the int32 tables and
    cumulative lengths that the Triton / flash-attn prefill kernels take."""

    def build(self, step: StepLayout) -> AttentionBatch:
        batch = super().build(step)
        dev = self.device
        if batch.decode is not None:
            d = batch.decode
            d.block_tables, d.context_lens = d.block_tables.to(dev), d.context_lens.to(dev)
        if batch.prefill is not None:
            batch.prefill = cuda_prefill_meta(batch.prefill, dev)
        batch.slot_blocks, batch.slot_offsets = batch.slot_blocks.to(dev), batch.slot_offsets.to(dev)
        return batch


def attention_backend(device: torch.device | str, block_size: int) -> AttentionBackend:
    device = torch.device(device)
    return (CudaAttentionBackend if device.type == "cuda" else AttentionBackend)(device, block_size)
