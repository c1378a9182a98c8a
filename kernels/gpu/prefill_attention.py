"""Prefill attention over the paged pool: causal, variable length, after a cached prefix.

The chunk's own K/V are already stored in the pool (store_kv runs first), so every key, prefix or
new, is read through the block table; no separate contiguous copy is needed. Grid (query tile,
query head); a tile is BLOCK_M query rows of one sequence. Keys past the causal diagonal of the
tile's last row are never loaded."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, mma


@triton.jit
def _attend(q, m_i, l_i, acc, K, V, BT, seq, kvh, prefix, offs_m, offs_d, md, n0, hi,
            skb, skt, skh, svb, svt, svh, sbt,
            PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr):
    """One BLOCK_N key tile of online softmax (log2 domain). CAUSAL masks the diagonal tiles only."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mn = offs_n < hi
    blk = tl.load(BT + seq * sbt + offs_n // PAGE, mask=mn, other=0)
    slot = offs_n % PAGE
    kv_mask = mn[:, None] & md[None, :]
    k = tl.load(K + blk[:, None] * skb + slot[:, None] * skt + kvh * skh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + blk[:, None] * svb + slot[:, None] * svt + kvh * svh + offs_d[None, :], mask=kv_mask, other=0.0)
    s = mma(q, tl.trans(k), DOT_F32)
    if CAUSAL:
        keep = (offs_n[None, :] <= (prefix + offs_m)[:, None]) & mn[None, :]
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _prefill(Q, K, V, OUT, BT, TILE_SEQ, TILE_M0, Q_START, Q_LEN, PREFIX,
             sqt, sqh, skb, skt, skh, svb, svt, svh, sot, soh, sbt, scale,
             G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(TILE_SEQ + tile)
    m0 = tl.load(TILE_M0 + tile)
    q_start = tl.load(Q_START + seq)
    n_q = tl.load(Q_LEN + seq)
    prefix = tl.load(PREFIX + seq)
    kvh = h // G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < n_q
    md = offs_d < D
    q = tl.load(Q + (q_start + offs_m)[:, None] * sqt + h * sqh + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
    q = (q.to(tl.float32) * (scale * 1.4426950408889634)).to(q.dtype)     # log2(e) folded: exp2 below
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = prefix + tl.minimum(n_q, m0 + BLOCK_M)          # keys needed by the tile's last row
    full = ((prefix + m0) // BLOCK_N) * BLOCK_N         # keys before this are visible to every row
    for n0 in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, K, V, BT, seq, kvh, prefix, offs_m, offs_d, md, n0, hi,
                                skb, skt, skh, svb, svt, svh, sbt, PAGE, BLOCK_N, False, DOT_F32)
    for n0 in range(full, hi, BLOCK_N):
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, K, V, BT, seq, kvh, prefix, offs_m, offs_d, md, n0, hi,
                                skb, skt, skh, svb, svt, svh, sbt, PAGE, BLOCK_N, True, DOT_F32)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + (q_start + offs_m)[:, None] * sot + h * soh + offs_d[None, :], o.to(OUT.dtype.element_ty),
             mask=mm[:, None] & md[None, :])


def tile_table(q_lens: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first row) of every BLOCK_M query tile; built once per step on the host."""
    seqs, starts = [], []
    for i, n in enumerate(q_lens):
        for m0 in range(0, n, block_m):
            seqs.append(i)
            starts.append(m0)
    return (torch.tensor(seqs, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int32, device=device))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, q_starts: list[int], q_lens: list[int],
                      prefix_lens: list[int], scale: float, block_m: int = 64, block_n: int = 64,
                      num_warps: int | None = None, num_stages: int = 2) -> torch.Tensor:
    """q [T, Hq, D] (rows of all sequences, flat); block_tables [S, max_pages] covering prefix+chunk."""
    T, H, D = q.shape
    page, KV = k_cache.shape[1], k_cache.shape[2]
    dev = q.device
    tiles_seq, tiles_m0 = tile_table(q_lens, block_m, dev)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
    out = torch.empty_like(q)
    if tiles_seq.numel() == 0:
        return out
    BLOCK_D = triton.next_power_of_2(D)
    _prefill[(tiles_seq.numel(), H)](
        q, k_cache, v_cache, out, block_tables, tiles_seq, tiles_m0, as_t(q_starts), as_t(q_lens), as_t(prefix_lens),
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
        block_tables.stride(0), scale,
        G=H // KV, D=D, BLOCK_D=BLOCK_D, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, DOT_F32=INTERPRET,
        num_warps=num_warps or (4 if BLOCK_D <= 64 else 8), num_stages=num_stages,
    )
    return out
