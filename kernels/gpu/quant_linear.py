"""Weight-only quantized GEMMs: y = x @ dequant(w)^T, dequantizing tiles in registers.

INT8: per-output-channel scales applied in the epilogue. INT4: GPTQ or AWQ packed words unpacked
per tile (layouts in kernels/quant.py), zeros and scales per group. For decode (small M) these are
weight-streaming bound: 1 (INT8) or 0.5 (INT4) bytes per weight instead of 2."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import Int4Weight
from .common import INTERPRET, mma


@triton.jit
def _int8_mm(X, W, S, BIAS, Y, M, N, K, sxm, swn, sym,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
             SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K       # split-K: more programs for skinny GEMVs
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mm = offs_m < M
    mn = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * k_per, tl.minimum(K, (pid_k + 1) * k_per), BLOCK_K):
        ks = k0 + offs_k
        mk = ks < K
        x = tl.load(X + offs_m[:, None] * sxm + ks[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * swn + ks[:, None], mask=mk[:, None] & mn[None, :], other=0)
        acc += mma(x, _to(w, x.dtype, DOT_F32), DOT_F32)
    acc = acc * tl.load(S + offs_n, mask=mn, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(BIAS + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    _write(Y, acc, offs_m, offs_n, sym, mm, mn, SPLIT_K)


@triton.jit
def _to(w, dtype: tl.constexpr, DOT_F32: tl.constexpr):
    """Integer tile -> dot operand. The interpreter converts int->bf16 wrongly, so it goes via fp32
    there; on a GPU it is one conversion per element."""
    if DOT_F32:
        return w.to(tl.float32).to(dtype)
    return w.to(dtype)


@triton.jit
def _write(Y, acc, offs_m, offs_n, sym, mm, mn, SPLIT_K: tl.constexpr):
    """Split-K partials add into an fp32 buffer (cast afterwards); otherwise store in Y's dtype."""
    ptr = Y + offs_m[:, None] * sym + offs_n[None, :]
    mask = mm[:, None] & mn[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(ptr, acc, mask=mask)
    else:
        tl.store(ptr, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _int4_mm(X, QW, QZ, S, GIDX, BIAS, Y, M, N, K, group_size, sxm, sq0, sq1, sz0, sz1, ss0, sym,
             AWQ: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
             RESHAPE: tl.constexpr, DOT_F32: tl.constexpr):
    """RESHAPE: each packed word is loaded once and unpacked by broadcasting against the 8 nibble
    shifts; otherwise each row re-loads its word (cache hits) and shifts it, with no reshape.
    Without act-order a K tile lies in one group (BLOCK_K divides group_size), so zeros and scales
    are one row per tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nib = tl.arange(0, 8)
    mm = offs_m < M
    mn = offs_n < N
    # nibble shift of column n in AWQ's interleaved order: AWQ_NIBBLE[n % 8] = (n % 8) // 2 + 4 * (n % 2)
    awq_shift = (((nib // 2) + 4 * (nib % 2)) * 4) if AWQ else nib * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    zn = offs_n // 8
    zshift = (((offs_n % 8) // 2) + 4 * (offs_n % 2)) * 4 if AWQ else (offs_n % 8) * 4
    for k0 in range(pid_k * k_per, tl.minimum(K, (pid_k + 1) * k_per), BLOCK_K):
        ks = k0 + offs_k
        mk = ks < K
        x = tl.load(X + offs_m[:, None] * sxm + ks[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        if RESHAPE:
            if AWQ:   # words [BLOCK_K, BLOCK_N/8], 8 columns each
                wn = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
                word = tl.load(QW + ks[:, None] * sq0 + wn[None, :] * sq1, mask=mk[:, None] & (wn < (N // 8))[None, :], other=0)
                q = tl.reshape((word[:, :, None] >> awq_shift[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
            else:     # GPTQ words [BLOCK_K/8, BLOCK_N], 8 consecutive k each
                wk = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                word = tl.load(QW + wk[:, None] * sq0 + offs_n[None, :] * sq1, mask=(wk < K // 8)[:, None] & mn[None, :], other=0)
                q = tl.reshape((word[:, None, :] >> (nib * 4)[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        else:
            wm = mk[:, None] & mn[None, :]
            if AWQ:
                word = tl.load(QW + ks[:, None] * sq0 + zn[None, :] * sq1, mask=wm, other=0)
                q = (word >> zshift[None, :]) & 0xF
            else:
                word = tl.load(QW + (ks // 8)[:, None] * sq0 + offs_n[None, :] * sq1, mask=wm, other=0)
                q = (word >> ((ks % 8) * 4)[:, None]) & 0xF
        if HAS_GIDX:   # act-order: every row has its own group
            g = tl.load(GIDX + ks, mask=mk, other=0)
            zw = tl.load(QZ + g[:, None] * sz0 + zn[None, :] * sz1, mask=mk[:, None] & mn[None, :], other=0)
            z = ((zw >> zshift[None, :]) & 0xF) + ZERO_OFFSET
            s = tl.load(S + g[:, None] * ss0 + offs_n[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
            w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        else:
            # One group per tile: zeros and scales are one row. (Folding them out of the dot as
            # (x.q - sum(x) z) * s measured 2x slower on an H100: the int->bf16 convert costs more.)
            g = k0 // group_size
            zw = tl.load(QZ + g * sz0 + zn * sz1, mask=mn, other=0)
            z = ((zw >> zshift) & 0xF) + ZERO_OFFSET
            s = tl.load(S + g * ss0 + offs_n, mask=mn, other=0.0)
            w = ((q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]).to(x.dtype)
        acc += mma(x, w, DOT_F32)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(BIAS + offs_n, mask=mn, other=0.0).to(tl.float32)[None, :]
    _write(Y, acc, offs_m, offs_n, sym, mm, mn, SPLIT_K)


def _blocks(M: int, cfg: tuple | None) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k). Decode (small M) is weight-streaming
    bound: narrow N tiles and split-K give enough programs to fill the SMs."""
    if cfg is not None:
        return tuple(cfg) + (1,) * (6 - len(cfg))
    if M <= 16:
        return 16, 32, 256, 4, 4, 1
    if M <= 64:
        return 64, 64, 128, 4, 3, 1
    return 128, 128, 64, 8, 3, 1


def _out(M: int, N: int, x: torch.Tensor, split_k: int) -> torch.Tensor:
    return torch.zeros(M, N, dtype=torch.float32, device=x.device) if split_k > 1 else \
        torch.empty(M, N, dtype=x.dtype, device=x.device)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                cfg: tuple | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = w.shape[0]
    BM, BN, BK, nw, ns, sk = _blocks(M, cfg)
    y = _out(M, N, x, sk)
    _int8_mm[(triton.cdiv(M, BM), triton.cdiv(N, BN), sk)](
        x2, w, scale, bias if bias is not None else scale, y, M, N, K, x2.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, HAS_BIAS=bias is not None, SPLIT_K=sk, DOT_F32=INTERPRET,
        num_warps=nw, num_stages=ns,
    )
    return y.to(x.dtype).view(*x.shape[:-1], N)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
                cfg: tuple | None = None, reshape: bool = True) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = w.out_features
    if cfg is None and M <= 16:
        cfg = (16, 64, 256, 4, 3, 4)     # best of the H100 sweep in benchmarks/kernels.py (split-K 4)
    BM, BN, BK, nw, ns, sk = _blocks(M, cfg)
    y = _out(M, N, x, sk)
    if w.g_idx is None:
        BK = min(BK, w.group_size)     # a K tile must not straddle groups
    else:
        BK, ns = min(BK, 64), 2        # per-row zero/scale tiles: keep shared memory in bounds
    _int4_mm[(triton.cdiv(M, BM), triton.cdiv(N, BN), sk)](
        x2, w.qweight, w.qzeros, w.scales, w.g_idx if w.g_idx is not None else w.scales,
        bias if bias is not None else w.scales, y, M, N, K, w.group_size, x2.stride(0),
        w.qweight.stride(0), w.qweight.stride(1), w.qzeros.stride(0), w.qzeros.stride(1), w.scales.stride(0),
        y.stride(0), AWQ=w.fmt == "awq", ZERO_OFFSET=w.zero_offset, HAS_GIDX=w.g_idx is not None,
        HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=sk, RESHAPE=reshape,
        DOT_F32=INTERPRET, num_warps=nw, num_stages=ns,
    )
    return y.to(x.dtype).view(*x.shape[:-1], N)
