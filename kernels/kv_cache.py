"""Write new K/V rows into paged blocks.

Caches are per-layer views of the block-major pool: [num_blocks, block_size, kv_heads, head_dim]
(strided: a block holds every layer, so one block is one contiguous span of the pool)."""

from __future__ import annotations

import torch

from . import cpu_ext


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
) -> None:
    for i in range(k.shape[0]):
        b, o = int(slot_blocks[i]), int(slot_offsets[i])
        k_cache[b, o] = k[i]
        v_cache[b, o] = v[i]


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
) -> None:
    """k, v: [tokens, kv_heads, head_dim]; token i goes to (slot_blocks[i], slot_offsets[i])."""
    if k.device.type == "cpu" and cpu_ext.available():
        torch.ops.baton_cpu.store_kv(k, v, k_cache, v_cache, slot_blocks, slot_offsets)
        return
    idx = (slot_blocks, slot_offsets)
    k_cache.index_put_(idx, k)
    v_cache.index_put_(idx, v)
