"""Attention over the paged KV pool.

decode_attention:  one query token per sequence, context read from its blocks.
prefill_attention: a chunk of query tokens per sequence, causal, after a (possibly cached) prefix.

Metadata is built once per engine step (not per layer) by the device's AttentionBackend
(kernels/attention_backend.py); the layers only read it.
On CPU both run as fused C++ kernels (csrc/cpu_ops.cpp) reading K/V straight from the blocks. The
torch fallbacks: decode gathers blocks with one index_select and runs fp32 bmm + softmax (~10x
faster than SDPA for one query token here), prefill runs SDPA per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import cpu_ext


@dataclass
class DecodeMeta:
    block_tables: torch.Tensor    # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor    # [B] int64, tokens of context incl. the new one
    block_size: int
    num_blocks: int               # blocks gathered per sequence (covers the longest context)
    flat_blocks: torch.Tensor     # [B * num_blocks] block ids to gather
    _mask: torch.Tensor | None = None
    _mask_built: bool = False

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], block_size: int) -> DecodeMeta:
        nb = max((n + block_size - 1) // block_size for n in context_lens)
        rows = [bt[:nb] + [0] * (nb - len(bt[:nb])) for bt in block_tables]
        tables = torch.tensor(rows, dtype=torch.int64)
        return cls(tables, torch.tensor(context_lens, dtype=torch.int64), block_size, nb, tables.view(-1))

    def padding_mask(self) -> torch.Tensor | None:
        """[B, 1, 1, num_blocks*block_size] additive fp32 (None if nothing is padded). Only the torch
        path needs it: built by its first layer, then reused by the others."""
        if not self._mask_built:
            span = self.num_blocks * self.block_size
            lens = self.context_lens.cpu()
            if not bool((lens == span).all()):
                pad = torch.arange(span).unsqueeze(0) >= lens.unsqueeze(1)
                self._mask = torch.zeros(len(lens), 1, 1, span).masked_fill_(pad.view(-1, 1, 1, span), float("-inf"))
            self._mask_built = True
        return self._mask


@dataclass
class PrefillMeta:
    """Per sequence: its query rows [q_start, q_end) in the flat batch and the prefix before them."""

    q_starts: list[int]
    q_ends: list[int]
    prefix_lens: list[int]
    block_tables: list[torch.Tensor]  # int64 block ids covering prefix + chunk
    padded_tables: torch.Tensor       # [S, max blocks] int64, padded with 0 (the fused CPU kernel's form)
    lens: torch.Tensor                # [3, S] int64: q_starts, q_lens, prefix_lens
    device_tables: torch.Tensor | None = None   # CUDA: padded_tables as int32 on the device
    cu_q: torch.Tensor | None = None            # CUDA: cumulative query / key lengths (int32, [S + 1])
    cu_k: torch.Tensor | None = None

    @classmethod
    def build(cls, q_starts: list[int], q_lens: list[int], prefix_lens: list[int],
              block_tables: list[list[int]], block_size: int) -> PrefillMeta:
        rows = [bt[: (p + n + block_size - 1) // block_size] for n, p, bt in zip(q_lens, prefix_lens, block_tables)]
        width = max(len(r) for r in rows)
        padded = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
        return cls(q_starts, [s + n for s, n in zip(q_starts, q_lens)], prefix_lens,
                   [padded[i, : len(r)] for i, r in enumerate(rows)], padded,
                   torch.tensor([q_starts, q_lens, prefix_lens], dtype=torch.int64))


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int,
            scales: torch.Tensor | None = None) -> torch.Tensor:
    """[num_blocks, bs, kvh, d] cache, block ids -> [length, kvh, d] contiguous (dequantized to fp32
    with [num_blocks, bs, kvh] scales when the cache is quantized)."""
    rows = cache.index_select(0, blocks).flatten(0, 1)[:length]
    if scales is None:
        return rows
    return rows.float() * scales.index_select(0, blocks).flatten(0, 1)[:length, :, None]


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: DecodeMeta, scale: float, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        n = int(meta.context_lens[i])
        k = _gather(k_cache, meta.block_tables[i], n, k_scale).float()
        v = _gather(v_cache, meta.block_tables[i], n, v_scale).float()
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("hd,thd->ht", q[i].float(), k) * scale
        out[i] = torch.einsum("ht,thd->hd", s.softmax(-1), v).to(q.dtype)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: DecodeMeta, scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Hq, D] -> [B, Hq, D]. k/v_scale: per (block, slot, kv head) for an INT8/FP8 cache."""
    if q.is_cuda:
        from .gpu.decode_attention import decode_attention as gpu

        return gpu(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                   meta.num_blocks * meta.block_size, k_scale, v_scale)
    if cpu_ext.available():
        return torch.ops.baton_cpu.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, k_scale, v_scale)
    B, H, D = q.shape
    kvh = k_cache.shape[2]
    span = meta.num_blocks * meta.block_size

    def gather(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """Blocks -> fp32 [B, kvh, T, D] in one copy (dequantized first for an INT8/FP8 cache)."""
        rows = cache.index_select(0, meta.flat_blocks)
        if scales is not None:
            rows = rows.float() * scales.index_select(0, meta.flat_blocks)[..., None]
        return torch.empty(B, kvh, span, D).copy_(rows.view(B, span, kvh, D).transpose(1, 2))

    k, v = gather(k_cache, k_scale), gather(v_cache, v_scale)
    qf = q.view(B, kvh, H // kvh, D).float() * scale   # not in place: .float() may alias q
    s = torch.matmul(qf, k.transpose(-1, -2))           # [B, kvh, g, T]
    mask = meta.padding_mask()
    if mask is not None:
        s += mask
    o = torch.matmul(s.softmax(-1), v)                   # [B, kvh, g, D]
    return o.view(B, H, D).to(q.dtype)


def _causal_mask(n: int, prefix: int) -> torch.Tensor:
    """Bool [n, prefix+n]: query j sees keys 0..prefix+j."""
    return torch.arange(prefix + n).unsqueeze(0) <= (torch.arange(n) + prefix).unsqueeze(1)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: PrefillMeta, scale: float, k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; k/v: the chunk's own [T, Hkv, D] (already stored in the cache)."""
    out = torch.empty_like(q)
    for s, e, p, bt in zip(meta.q_starts, meta.q_ends, meta.prefix_lens, meta.block_tables):
        n = e - s
        kk = _gather(k_cache, bt, p + n, k_scale).float()
        vv = _gather(v_cache, bt, p + n, v_scale).float()
        g = q.shape[1] // kk.shape[1]
        kk, vv = kk.repeat_interleave(g, 1), vv.repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", q[s:e].float(), kk) * scale
        sc = sc.masked_fill(~_causal_mask(n, p), float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv).to(q.dtype)
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: PrefillMeta, scale: float, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """k/v_scale: per (block, slot, kv head) for an INT8/FP8 cache."""
    if not q.is_cuda and cpu_ext.available():
        lens = meta.lens
        return torch.ops.baton_cpu.paged_prefill_attention(q, k_cache, v_cache, meta.padded_tables,
                                                           lens[0], lens[1], lens[2], scale, k_scale, v_scale)
    if k_scale is not None:     # no other kernel reads scales: attend over the chunk's blocks dequantized
        assert v_scale is not None
        return prefill_attention_ref(q, k, v, k_cache, v_cache, meta, scale, k_scale, v_scale)
    if q.is_cuda:
        return _prefill_cuda(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    for s, e, p, bt in zip(meta.q_starts, meta.q_ends, meta.prefix_lens, meta.block_tables):
        n = e - s
        qs = q[s:e].transpose(0, 1).unsqueeze(0)
        if p == 0:  # no prefix: attend to the chunk's own K/V, no gather
            ks, vs = k[s:e], v[s:e]
            mask, causal = None, True
        else:
            ks, vs = _gather(k_cache, bt, p + n), _gather(v_cache, bt, p + n)
            mask, causal = _causal_mask(n, p), False
        o = F.scaled_dot_product_attention(
            qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[s:e] = o.squeeze(0).transpose(0, 1)
    return out


def _prefill_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: PrefillMeta, scale: float) -> torch.Tensor:
    """flash-attn's paged varlen kernel when installed and the page size suits it (FA2 needs pages of
    a multiple of 256 tokens), else the Triton kernel."""
    if meta.device_tables is None:          # built per step by the CUDA backend; this is a direct call
        meta = cuda_prefill_meta(meta, q.device)
    tables = meta.device_tables
    q_lens = [e - s for s, e in zip(meta.q_starts, meta.q_ends)]
    if k_cache.shape[1] % 256 == 0:
        try:
            from flash_attn import flash_attn_varlen_func  # pyright: ignore[reportMissingImports] (optional, GPU)
        except ImportError:
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None:
            k_lens = [p + n for p, n in zip(meta.prefix_lens, q_lens)]
            return flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_q, meta.cu_k, max(q_lens), max(k_lens),
                                          softmax_scale=scale, causal=True, block_table=tables)
    from .gpu.prefill_attention import prefill_attention as triton_prefill

    return triton_prefill(q, k_cache, v_cache, tables, meta.q_starts, q_lens, meta.prefix_lens, scale)


def cuda_prefill_meta(meta: PrefillMeta, device: torch.device) -> PrefillMeta:
    """`meta` with the CUDA kernels' forms (int32 tables and cumulative lengths on the device)."""
    q_lens = [e - s for s, e in zip(meta.q_starts, meta.q_ends)]
    k_lens = [p + n for p, n in zip(meta.prefix_lens, q_lens)]

    def cu(xs: list[int]) -> torch.Tensor:
        return torch.tensor([0] + torch.tensor(xs).cumsum(0).tolist(), dtype=torch.int32, device=device)

    return replace(meta, device_tables=meta.padded_tables.to(device=device, dtype=torch.int32),
                   cu_q=cu(q_lens), cu_k=cu(k_lens))


@dataclass
class AttentionBatch:
    """A flat batch: the first `num_decode` rows are single-token decodes, the rest prefill chunks.
    `slot_blocks/slot_offsets` say where each row's new K/V goes."""

    num_decode: int
    decode: DecodeMeta | None
    prefill: PrefillMeta | None
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stores the batch's K/V into the pool (quantized, with k/v_scale, for an INT8/FP8 cache), then
    attends. q: [T, Hq, D], k/v: [T, Hkv, D]."""
    from .kv_cache import store_kv

    store_kv(k, v, k_cache, v_cache, batch.slot_blocks, batch.slot_offsets, k_scale, v_scale)
    nd = batch.num_decode
    if batch.prefill is None:
        return decode_attention(q, k_cache, v_cache, batch.decode, scale, k_scale, v_scale)
    if nd == 0:
        return prefill_attention(q, k, v, k_cache, v_cache, batch.prefill, scale, k_scale, v_scale)
    out = torch.empty_like(q)
    out[:nd] = decode_attention(q[:nd], k_cache, v_cache, batch.decode, scale, k_scale, v_scale)
    out[nd:] = prefill_attention(q[nd:], k[nd:], v[nd:], k_cache, v_cache, batch.prefill, scale, k_scale, v_scale)
    return out
