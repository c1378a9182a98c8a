"""CPU kernel benchmark: Baton's C++ kernels against the library paths they replace, in one process
with alternating repeats (the box's speed drifts by tens of percent within minutes).

- bf16 linear: `linear_packed_bf16` against oneDNN's matmul on the same packed weight, over small's
  four layer shapes (qkv 1280x768, o 768x768, gate|up 4096x768, down 768x2048), by row count. One
  layer's weights (12.6 MB) stay in the L3 cache between repeats;
- the decode case, where they do not: all of small's GEMM weights (12 layers + lm_head, 200 MB) in
  turn at 1 and 8 rows, as a decode step reads them from DRAM, reported as GB/s of weights read;
- paged attention (small's heads: 12 q / 4 kv, head_dim 64, bf16): the decode and prefill kernels
  against torch SDPA on the same K/V gathered into contiguous tensors (the gather is not timed).

    python benchmarks/cpu_kernels.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from baton.backends.runtime import configure_process  # isort: skip

configure_process()  # before torch loads: OpenMP workers spin as in serving

import torch
import torch.nn.functional as F

from baton.kernels import cpu_ext
from baton.kernels.attention import DecodeMeta, PrefillMeta, decode_attention, prefill_attention
from baton.kernels.linear import LinearWeight

SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)]


def paired(a: Callable[[], object], b: Callable[[], object], reps: int, rounds: int = 7) -> tuple[float, float]:
    """Median seconds per call of a and b, timed in alternating rounds."""
    ta, tb = [], []
    a(), b()
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) / reps)
    return statistics.median(ta), statistics.median(tb)


def gemv_chains(lws: list[tuple[int, int, LinearWeight]], m: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two closures running every weight in turn on m rows: Baton's kernel, then oneDNN's."""
    x = {k: torch.randn(m, k).bfloat16() for k in {k for _, k, _ in lws}}

    def ours() -> None:
        for n, k, lw in lws:
            torch.ops.baton_cpu.linear_packed_bf16(x[k], lw._blob, n, k, None)

    def onednn() -> None:
        for _, k, lw in lws:
            torch.ops.mkldnn._linear_pointwise(x[k], lw.packed, None, "none", [], "")

    return ours, onednn


def linear_rows() -> list[dict]:
    torch.manual_seed(0)
    lws = [(n, k, LinearWeight((torch.randn(n, k) * 0.05).bfloat16())) for n, k in SHAPES]
    assert all(lw.direct for _, _, lw in lws), "linear_packed_bf16 cannot read this CPU's oneDNN layout"
    rows = []
    for m in (1, 4, 8, 12, 16, 32, 64, 128, 256, 512):
        a, b = paired(*gemv_chains(lws, m), max(3, 1000 // m))
        flop = 2 * m * sum(n * k for n, k in SHAPES)
        rows.append({"rows": m, "baton_ms": 1e3 * a, "onednn_ms": 1e3 * b, "baton_gflops": flop / a / 1e9,
                     "onednn_gflops": flop / b / 1e9, "speedup": b / a})
        print(f"linear  M={m:4d}: baton {1e3 * a:7.3f} ms ({flop / a / 1e9:5.0f} GFLOP/s)  oneDNN {1e3 * b:7.3f} ms "
              f"({flop / b / 1e9:5.0f})  x{b / a:.2f}", flush=True)
    return rows


def model_gemv_rows() -> list[dict]:
    torch.manual_seed(0)
    shapes = SHAPES * 12 + [(32000, 768)]
    lws = [(n, k, LinearWeight((torch.randn(n, k) * 0.05).bfloat16())) for n, k in shapes]
    nbytes = 2 * sum(n * k for n, k in shapes)
    rows = []
    for m in (1, 8):
        a, b = paired(*gemv_chains(lws, m), 5)
        rows.append({"rows": m, "weight_mb": nbytes / 1e6, "baton_ms": 1e3 * a, "onednn_ms": 1e3 * b,
                     "baton_gbs": nbytes / a / 1e9, "onednn_gbs": nbytes / b / 1e9, "speedup": b / a})
        print(f"model GEMVs M={m}: baton {1e3 * a:6.2f} ms ({nbytes / a / 1e9:4.1f} GB/s)  oneDNN {1e3 * b:6.2f} ms "
              f"({nbytes / b / 1e9:4.1f} GB/s)  x{b / a:.2f}", flush=True)
    return rows


def attention_rows() -> list[dict]:
    torch.manual_seed(0)
    hq, hkv, d, bs, scale = 12, 4, 64, 16, 0.125
    kc = torch.randn(4096, bs, hkv, d).bfloat16()
    vc = torch.randn_like(kc)
    rows = []
    for b, ctx in [(1, 200), (8, 200), (32, 500)]:
        nb = -(-ctx // bs)
        tables = [list(range(i * nb, (i + 1) * nb)) for i in range(b)]
        meta = DecodeMeta.build(tables, [ctx] * b, bs)
        q = torch.randn(b, hq, d).bfloat16()
        ks = torch.stack([kc[t].flatten(0, 1)[:ctx] for t in meta.block_tables]).transpose(1, 2)  # [b, hkv, ctx, d]
        vs = torch.stack([vc[t].flatten(0, 1)[:ctx] for t in meta.block_tables]).transpose(1, 2)
        qs = q.unsqueeze(2)                                                                       # [b, hq, 1, d]
        a, s = paired(partial(decode_attention, q, kc, vc, meta, scale),
                      partial(F.scaled_dot_product_attention, qs, ks, vs, scale=scale, enable_gqa=True),
                      max(5, 400 // b))
        rows.append({"op": "decode", "batch": b, "context": ctx, "baton_us": 1e6 * a, "sdpa_us": 1e6 * s})
        print(f"decode  b={b:2d} ctx={ctx}: baton {1e6 * a:7.1f} us  SDPA (contiguous K/V) {1e6 * s:7.1f} us", flush=True)
    for n in (128, 512):
        table = list(range(-(-n // bs)))
        meta = PrefillMeta.build([0], [n], [0], [table], bs)
        q = torch.randn(n, hq, d).bfloat16()
        ks = kc[table].flatten(0, 1)[:n].transpose(0, 1).unsqueeze(0)
        vs = vc[table].flatten(0, 1)[:n].transpose(0, 1).unsqueeze(0)
        qs = q.transpose(0, 1).unsqueeze(0)
        a, s = paired(partial(prefill_attention, q, None, None, kc, vc, meta, scale),
                      partial(F.scaled_dot_product_attention, qs, ks, vs, is_causal=True, scale=scale,
                              enable_gqa=True),
                      max(3, 4000 // n))
        rows.append({"op": "prefill", "tokens": n, "baton_us": 1e6 * a, "sdpa_us": 1e6 * s})
        print(f"prefill n={n}: baton {1e6 * a:8.1f} us  SDPA causal {1e6 * s:8.1f} us", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not cpu_ext.available():
        raise SystemExit("the C++ CPU extension is not available (BATON_CPU_EXT=0 or no compiler)")
    torch.set_num_threads(a.threads)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": a.threads,
              "linear": linear_rows(),
              "model_gemv": model_gemv_rows(), "attention": attention_rows()}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
