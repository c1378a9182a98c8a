"""Store new K/V rows into paged blocks, optionally quantized to INT8 or FP8 (e4m3).

A quantized pool keeps one fp32 scale per (block, slot, kv head): max|x| / qmax of that row, so a
row is quantized when written and never needs re-scaling as its block fills."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv(K, V, KC, VC, KS, VS, BLK, OFF, skt, skh, svt, svh, scb, sct, sch, svcb, svct, svch, ssb, sst,
              KV, D: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // KV
    h = pid % KV
    offs = tl.arange(0, D)
    b = tl.load(BLK + t)
    o = tl.load(OFF + t)
    k = tl.load(K + t * skt + h * skh + offs)
    v = tl.load(V + t * svt + h * svh + offs)
    if QUANT:
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        ks = tl.maximum(tl.max(tl.abs(kf), 0), 1e-8) / QMAX
        vs = tl.maximum(tl.max(tl.abs(vf), 0), 1e-8) / QMAX
        kq = kf / ks
        vq = vf / vs
        if IS_INT:
            kq = tl.floor(kq + 0.5)      # round half up; the reference does the same
            vq = tl.floor(vq + 0.5)
        tl.store(KC + b * scb + o * sct + h * sch + offs, kq.to(KC.dtype.element_ty))
        tl.store(VC + b * svcb + o * svct + h * svch + offs, vq.to(VC.dtype.element_ty))
        tl.store(KS + b * ssb + o * sst + h, ks)
        tl.store(VS + b * ssb + o * sst + h, vs)
    else:
        tl.store(KC + b * scb + o * sct + h * sch + offs, k)
        tl.store(VC + b * svcb + o * svct + h * svch + offs, v)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    T, KV, D = k.shape
    if T == 0:
        return
    quant = k_scale is not None
    is_int = k_cache.dtype == torch.int8
    qmax = 127.0 if is_int else 448.0
    ks, vs = (k_scale, v_scale) if quant else (slot_blocks, slot_blocks)
    _store_kv[(T * KV,)](
        k, v, k_cache, v_cache, ks, vs, slot_blocks, slot_offsets,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        ks.stride(0) if quant else 0, ks.stride(1) if quant else 0,
        KV, D=D, QUANT=quant, QMAX=qmax, IS_INT=is_int,
    )
