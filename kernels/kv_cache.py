"""Write new K/V rows into paged blocks.

Caches are per-layer views of the block-major pool: [num_blocks, block_size, kv_heads, head_dim]
(strided: a block holds every layer, so one block is one contiguous span of the pool)."""

from __future__ import annotations

import torch

from . import cpu_ext

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, KV, D] -> (quantized [T, KV, D], fp32 scales [T, KV]): one scale per (token, kv head)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp(min=1e-8) / QMAX[dtype]
    y = xf / scale[..., None]
    if dtype == torch.int8:
        y = torch.floor(y + 0.5)
    return y.to(dtype), scale


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    if k_scale is not None:
        (k, ks), (v, vs) = quantize_rows(k, k_cache.dtype), quantize_rows(v, v_cache.dtype)
    for i in range(k.shape[0]):
        b, o = int(slot_blocks[i]), int(slot_offsets[i])
        k_cache[b, o] = k[i]
        v_cache[b, o] = v[i]
        if k_scale is not None:
            k_scale[b, o] = ks[i]
            v_scale[b, o] = vs[i]


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [tokens, kv_heads, head_dim]; token i goes to (slot_blocks[i], slot_offsets[i]).
    With k/v_scale ([num_blocks, block_size, kv_heads] fp32) the rows are quantized to the cache dtype."""
    if k.is_cuda:
        from .gpu.kv_cache import store_kv as gpu

        gpu(k, v, k_cache, v_cache, slot_blocks, slot_offsets, k_scale, v_scale)
        return
    idx = (slot_blocks, slot_offsets)
    if k_scale is not None and cpu_ext.available():
        assert v_scale is not None
        torch.ops.baton_cpu.store_kv_quant(k, v, k_cache, v_cache, k_scale, v_scale, slot_blocks, slot_offsets)
        return
    if k_scale is not None:
        (kq, ks), (vq, vs) = quantize_rows(k, k_cache.dtype), quantize_rows(v, v_cache.dtype)
        k_cache.index_put_(idx, kq)
        v_cache.index_put_(idx, vq)
        k_scale.index_put_(idx, ks)
        v_scale.index_put_(idx, vs)
        return
    if cpu_ext.available():
        torch.ops.baton_cpu.store_kv(k, v, k_cache, v_cache, slot_blocks, slot_offsets)
        return
    k_cache.index_put_(idx, k)
    v_cache.index_put_(idx, v)
