"""Paged decode attention (flash-decoding): one query token per sequence.

Grid (sequence, kv head, split). Each program takes all G query heads that share a kv head, so a
K/V tile is loaded once for the group, and walks its split of the context in tiles of BLOCK_N
tokens (several pages: the block id is looked up per token). Splits write a partial output and
log-sum-exp; a second kernel merges them. Splitting keeps every SM busy when batch * kv_heads is
small and contexts are long. Optional INT8/FP8 K/V with one fp32 scale per (block, slot, kv head)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, mma


@triton.jit
def _decode_split(Q, K, V, KS, VS, BT, LENS, MO, MLSE,
                  sqb, sqh, skb, skt, skh, svb, svt, svh, ssb, sst, sbt, smb, smh, sms, slb, slh,
                  scale, pages_per_split,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, DOT_F32: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(LENS + b)
    start = split * pages_per_split * PAGE
    end = tl.minimum(n, start + pages_per_split * PAGE)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mg = offs_g < G
    md = offs_d < D
    heads = kvh * G + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(tl.bfloat16 if QUANT else q.dtype)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        mn = offs_n < end
        blk = tl.load(BT + b * sbt + offs_n // PAGE, mask=mn, other=0)
        slot = offs_n % PAGE
        kv_mask = mn[:, None] & md[None, :]
        k = tl.load(K + blk[:, None] * skb + slot[:, None] * skt + kvh * skh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + blk[:, None] * svb + slot[:, None] * svt + kvh * svh + offs_d[None, :], mask=kv_mask, other=0.0)
        if QUANT:
            # A scale belongs to a whole token row, so it commutes with the dots: scale the scores
            # (K) and the probabilities (V) instead of dequantizing every element. int8 and fp8
            # values are exact in bf16.
            ks = tl.load(KS + blk * ssb + slot * sst + kvh, mask=mn, other=0.0)
            vs = tl.load(VS + blk * ssb + slot * sst + kvh, mask=mn, other=0.0)
            s = mma(q, tl.trans(k.to(tl.float32).to(tl.bfloat16)), DOT_F32) * ks[None, :]
        else:
            s = mma(q, tl.trans(k), DOT_F32)             # [BLOCK_G, BLOCK_N], fp32
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            acc = acc * alpha[:, None] + mma((p * vs[None, :]).to(tl.bfloat16), v.to(tl.float32).to(tl.bfloat16), DOT_F32)
        else:
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    out_mask = mg[:, None] & md[None, :]
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(MO + b * smb + heads[:, None] * smh + split * sms + offs_d[None, :], o, mask=out_mask)
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    tl.store(MLSE + b * slb + heads * slh + split, lse, mask=mg)


@triton.jit
def _decode_merge(MO, MLSE, OUT, smb, smh, sms, slb, slh, sob, soh, S,
                  BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    ms = offs_s < S
    md = offs_d < D
    lse = tl.load(MLSE + b * slb + h * slh + offs_s, mask=ms, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(ms, tl.exp(lse - m), 0.0)
    o = tl.load(MO + b * smb + h * smh + offs_s[:, None] * sms + offs_d[None, :], mask=ms[:, None] & md[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * sob + h * soh + offs_d, out.to(OUT.dtype.element_ty), mask=md)


def num_splits(batch: int, kv_heads: int, max_pages: int, sm_count: int) -> int:
    """Enough splits to give ~2 programs per SM, each over >= 4 pages."""
    want = max(1, (2 * sm_count) // max(1, batch * kv_heads))
    return max(1, min(want, triton.cdiv(max_pages, 4)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     max_context_len: int, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, splits: int | None = None,
                     block_n: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """q [B, Hq, D]; caches [num_blocks, page, Hkv, D] (strided views of the pool); block_tables
    [B, max_pages] int; context_lens [B] int; k/v_scale [num_blocks, page, Hkv] fp32 when quantized."""
    B, H, D = q.shape
    page, KV = k_cache.shape[1], k_cache.shape[2]
    G = H // KV
    max_pages = triton.cdiv(max_context_len, page)
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = num_splits(B, KV, max_pages, sms)
    pages_per_split = triton.cdiv(max_pages, splits)
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_N = block_n or max(16, min(64, page * max(1, 64 // page)))
    mid_o = torch.empty(B, H, splits, BLOCK_D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    quant = k_scale is not None
    ks, vs = (k_scale, v_scale) if quant else (context_lens, context_lens)   # unused placeholders
    _decode_split[(B, KV, splits)](
        q, k_cache, v_cache, ks, vs, block_tables, context_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        ks.stride(0) if quant else 0, ks.stride(1) if quant else 0, block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scale, pages_per_split,
        G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, PAGE=page, BLOCK_N=BLOCK_N, QUANT=quant, DOT_F32=INTERPRET,
        num_warps=num_warps,
    )
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _decode_merge[(B, H)](mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
                          mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), splits,
                          BLOCK_S=max(2, triton.next_power_of_2(splits)), D=D, BLOCK_D=BLOCK_D)
    return out
