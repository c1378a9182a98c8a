"""GPU kernel benchmark: achieved bandwidth / throughput of the Triton kernels against the device's
own measured ceilings (a large device-to-device copy; a large bf16 GEMM) and against library
baselines in the same process (cuBLAS bf16 GEMV; torch SDPA's flash backend for prefill).

    python benchmarks/kernels.py [--out results.json]     (needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from triton.testing import do_bench

from baton.kernels import quant
from baton.kernels.gpu.decode_attention import decode_attention
from baton.kernels.gpu.prefill_attention import prefill_attention
from baton.kernels.gpu.quant_linear import int4_linear, int8_linear

DEV = "cuda"


def bench(fn) -> float:
    """Median ms over event-timed repeats (do_bench clears L2 between runs)."""
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def ceilings() -> dict:
    x = torch.empty(2 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    mm = bench(lambda: a @ a)
    return {"copy_GBps": 2 * (2 << 30) / ms / 1e6, "bf16_gemm_TFLOPs": 2 * 8192**3 / mm / 1e9}


def paged_pool(num_blocks: int, page: int, kvh: int, d: int, dtype: torch.dtype, layers: int = 2):
    pool = torch.randn(num_blocks, layers, 2, page, kvh, d, device=DEV).to(dtype)
    return pool, pool[:, 0, 0], pool[:, 0, 1]


def decode_case(B: int, ctx: int, H: int, KV: int, D: int, quantized: bool, page: int = 16) -> dict:
    pages = ctx // page
    nb = B * pages + 8
    tables = torch.stack([torch.randperm(nb - 8, device=DEV)[:pages] for _ in range(B)]).to(torch.int32)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(B, H, D, device=DEV, dtype=torch.bfloat16)
    if quantized:
        _, kc, vc = paged_pool(nb, page, KV, D, torch.bfloat16, layers=1)
        kq, vq = kc.to(torch.int8), vc.to(torch.int8)
        ks = torch.rand(nb, page, KV, device=DEV) + 0.5
        vs = torch.rand(nb, page, KV, device=DEV) + 0.5
        args = (q, kq, vq, tables, lens, D ** -0.5, ctx, ks, vs)
        nbytes = B * ctx * KV * (2 * D * 1 + 2 * 4)
    else:
        _, kc, vc = paged_pool(nb, page, KV, D, torch.bfloat16, layers=1)
        args = (q, kc, vc, tables, lens, D ** -0.5, ctx)
        nbytes = B * ctx * KV * 2 * D * 2
    best = None
    for bn in (32, 64, 128):
        for nw in (4, 8):
            ms = bench(lambda bn=bn, nw=nw: decode_attention(*args, block_n=bn, num_warps=nw))
            if best is None or ms < best[0]:
                best = (ms, bn, nw)
    ms, bn, nw = best
    return {"kernel": "decode_attention", "B": B, "ctx": ctx, "H": H, "KV": KV, "D": D,
            "kv": "int8" if quantized else "bf16", "ms": ms, "GBps": nbytes / ms / 1e6, "block_n": bn, "warps": nw}


GEMV_CFGS = [(16, bn, bk, nw, 3, sk) for bn in (32, 64) for bk in (128, 256) for nw in (4, 8) for sk in (1, 2, 4)]


def best_cfg(fn, cfgs: list) -> tuple[float, tuple]:
    """Sweep (short runs), then time the winner properly. None = the launcher's default."""
    scored = []
    for cfg in [None] + cfgs:
        try:
            scored.append((do_bench(lambda cfg=cfg: fn(cfg), warmup=10, rep=40, return_mode="median"), cfg))
        except Exception:          # out of shared memory etc.
            continue
    cfg = min(scored, key=lambda t: t[0])[1]
    return bench(lambda: fn(cfg)), cfg


def gemv_cases() -> list[dict]:
    out = []
    best8 = best4 = None
    for N, K in ((8192, 8192), (28672, 4096)):
        x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16)
        ms_bf16 = bench(lambda x=x, w=w: x @ w.T)
        wq, sc = quant.quantize_int8(w)
        sweep = GEMV_CFGS if N == 8192 else []                 # sweep one shape; the other reuses the best
        ms8, cfg8 = best_cfg(lambda cfg, x=x, wq=wq, sc=sc: int8_linear(x, wq, sc, cfg=cfg), sweep or [best8])
        q, z, s = quant.quantize_int4(w.float(), 128)
        w4 = quant.pack_gptq(q, z, s.half(), 128)
        int4_cfgs = [c + (r,) for c in (sweep or [best4[:-1]]) for r in (True, False)] if sweep else [best4]
        ms4, cfg4 = best_cfg(lambda cfg, x=x, w4=w4: int4_linear(x, w4, cfg=cfg and cfg[:-1],
                                                                  reshape=cfg[-1] if cfg else True), int4_cfgs)
        awq = quant.pack_awq(q, z, s.half(), 128)
        msa, cfga = best_cfg(lambda cfg, x=x, awq=awq: int4_linear(x, awq, cfg=cfg and cfg[:-1],
                                                                    reshape=cfg[-1] if cfg else True), [cfg4] if cfg4 else [])
        best8, best4 = cfg8 or (16, 32, 256, 4, 4, 1), cfg4 or (16, 32, 256, 4, 4, 1, True)
        int4_bytes = N * K // 2 + (K // 128) * N * (2 + 0.5)
        for name, ms, nbytes, cfg in (("cublas_bf16_gemv", ms_bf16, N * K * 2, None),
                                      ("int8_gemv", ms8, N * K + N * 4, cfg8),
                                      ("int4_gptq_gemv", ms4, int4_bytes, cfg4),
                                      ("int4_awq_gemv", msa, int4_bytes, cfga)):
            out.append({"kernel": name, "N": N, "K": K, "ms": ms, "GBps": nbytes / ms / 1e6, "cfg": cfg})
    return out


def prefill_case(S: int, n: int, H: int, KV: int, D: int, page: int = 16) -> list[dict]:
    T = S * n
    pages = n // page
    nb = S * pages
    _, kc, vc = paged_pool(nb, page, KV, D, torch.bfloat16, layers=1)
    tables = torch.arange(nb, device=DEV, dtype=torch.int32).view(S, pages)
    q = torch.randn(T, H, D, device=DEV, dtype=torch.bfloat16)
    starts, lens, prefixes = [i * n for i in range(S)], [n] * S, [0] * S
    flops = S * 4 * H * D * n * n / 2          # causal: half of QK^T and PV
    rows = []
    best = None
    for bm, bn, nw, st in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3),
                           (64, 64, 4, 3)):
        ms = bench(lambda bm=bm, bn=bn, nw=nw, st=st: prefill_attention(
            q, kc, vc, tables, starts, lens, prefixes, D ** -0.5, bm, bn, nw, st))
        if best is None or ms < best[0]:
            best = (ms, bm, bn, nw, st)
    ms, bm, bn, nw, st = best
    rows.append({"kernel": "prefill_attention_paged", "seqs": S, "n": n, "H": H, "KV": KV, "D": D, "ms": ms,
                 "TFLOPs": flops / ms / 1e9, "tile": [bm, bn, nw, st]})
    # baseline: torch SDPA (flash backend) on contiguous tensors, kv heads repeated to H
    qs = q.view(S, n, H, D).transpose(1, 2)
    k = torch.randn(S, H, n, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms_ref = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, is_causal=True))
    rows.append({"kernel": "sdpa_flash (contiguous)", "seqs": S, "n": n, "H": H, "KV": KV, "D": D, "ms": ms_ref,
                 "TFLOPs": flops / ms_ref / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__, "ceilings": ceilings(), "rows": []}
    peak = res["ceilings"]["copy_GBps"]
    print(f"{props.name}: copy {peak:.0f} GB/s, bf16 GEMM {res['ceilings']['bf16_gemm_TFLOPs']:.0f} TFLOP/s", flush=True)

    def report(rows: list[dict]) -> None:
        for r in rows:
            res["rows"].append(r)
            metric = (f"{r['GBps']:7.0f} GB/s ({100 * r['GBps'] / peak:5.1f}% of copy)" if "GBps" in r
                      else f"{r['TFLOPs']:7.1f} TFLOP/s")
            shape = {k: v for k, v in r.items() if k not in ("kernel", "ms", "GBps", "TFLOPs")}
            print(f"{r['kernel']:26s} {r['ms']:8.3f} ms  {metric}  {shape}", flush=True)

    sections = [lambda B=B, qz=qz: [decode_case(B, 4096, 32, 8, 128, qz)] for B in (32, 64) for qz in (False, True)]
    sections += [gemv_cases, lambda: prefill_case(4, 4096, 32, 8, 128)]
    for section in sections:
        try:                       # one failing section must not lose the others' numbers
            report(section())
        except Exception:
            import traceback

            traceback.print_exc()
    print(f"total {time.time() - t0:.0f}s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
