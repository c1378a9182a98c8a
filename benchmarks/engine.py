"""Offline engine benchmark: decode tok/s at batch 1 and 8 and TTFT of one 128-token prompt, with
transformers generate() measured in the same process on the same prompts. Greedy, EOS ignored.

    python benchmarks/engine.py --model .cache/checkpoints/small [--threads 2] [--out results.json]

--dtype float32 runs both engines in fp32. --kernel-ab also runs Baton with its AVX2 matmul kernel
off (`baton_flinear`: F.linear for every matmul), alternating with it on, and prints the ratio: in
fp32 linear_f32 (up to F32_KERNEL_ROWS rows), in bf16 linear_bf16 (on CPUs without native bf16 GEMMs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time
from pathlib import Path

from baton.backends.runtime import configure_process  # isort: skip

configure_process()  # before torch loads: OpenMP workers spin as in serving

import torch

from baton import EngineConfig, LLMEngine, SamplingParams

linear_mod = importlib.import_module("baton.kernels.linear")   # the module (baton.kernels.linear is also a function)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 1, (length,), generator=g).tolist() for _ in range(n)]


def baton_run(engine: LLMEngine, batch: list[list[int]], new: int) -> tuple[float, float]:
    """Returns (time to first token of the batch, decode tok/s after it)."""
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = [engine.add_request(p, sp) for p in batch]
    t_first = None
    while engine.has_unfinished():
        engine.step()
        if t_first is None and all(s.num_output_tokens >= 1 for s in seqs):
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    assert all(s.num_output_tokens == new for s in seqs)
    return t_first - t0, len(batch) * (new - 1) / (t_end - t_first)


def hf_run(model, batch: list[list[int]], new: int) -> tuple[float, float]:
    ids = torch.tensor(batch)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new
    ttft = t1 - t0
    return ttft, len(batch) * (new - 1) / ((t2 - t1) - ttft)


def bf16_kernel(on: bool, weights: list | None = None) -> list:
    """Turn linear_bf16 off (or back on) for every weight that uses it; returns those weights."""
    import gc

    if weights is None:
        weights = [o for o in gc.get_objects() if isinstance(o, linear_mod.LinearWeight) and o.bf16]
    for w in weights:
        w.bf16 = on
    return weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/checkpoints/small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--kernel-ab", "--f32-kernel-ab", action="store_true",
                    help="also Baton with F.linear in place of its fp32 / bf16 AVX2 kernels")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    engine = LLMEngine(EngineConfig(model=a.model, dtype=a.dtype, enable_prefix_caching=False, threads=a.threads))
    vocab = engine.config.vocab_size
    results: dict[str, dict] = {"baton": {}, "transformers": {}}
    hf = None
    if not a.skip_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).eval()

    def measure(name: str, fn, bsz: int) -> None:
        ttfts, rates = [], []
        for r in range(a.repeats):
            ttft, rate = fn(prompts(bsz, a.prompt_len, vocab, seed=100 * bsz + r), a.new)
            ttfts.append(ttft)
            rates.append(rate)
        results.setdefault(name, {})[f"batch{bsz}"] = {"ttft_ms": 1000 * statistics.median(ttfts),
                                         "decode_tok_s": statistics.median(rates)}
        print(f"{name:13s} batch {bsz}: TTFT {1000 * statistics.median(ttfts):7.1f} ms   "
              f"decode {statistics.median(rates):7.1f} tok/s   (runs: {[round(x, 1) for x in rates]})", flush=True)

    baton_run(engine, prompts(2, a.prompt_len, vocab, seed=1), 8)        # warm-up
    for bsz in (1, 8):
        # interleave engines per batch size so both see the same minute of this noisy machine
        measure("baton", lambda b, n: baton_run(engine, b, n), bsz)
        if a.kernel_ab:
            rows, linear_mod.F32_KERNEL_ROWS = linear_mod.F32_KERNEL_ROWS, 0
            bf16 = bf16_kernel(False)
            measure("baton_flinear", lambda b, n: baton_run(engine, b, n), bsz)
            linear_mod.F32_KERNEL_ROWS = rows
            bf16_kernel(True, bf16)
        if hf is not None:
            hf_run(hf, prompts(1, a.prompt_len, vocab, seed=2), 4)
            measure("transformers", lambda b, n: hf_run(hf, b, n), bsz)
    if a.kernel_ab:
        for k in ("batch1", "batch8"):
            b, f = results["baton"][k], results["baton_flinear"][k]
            print(f"{a.dtype} kernel / F.linear {k}: decode {b['decode_tok_s'] / f['decode_tok_s']:.2f}x, "
                  f"TTFT {f['ttft_ms'] / b['ttft_ms']:.2f}x faster")
    if hf is not None:
        for k in ("batch1", "batch8"):
            b, h = results["baton"][k], results["transformers"][k]
            print(f"ratio {k}: decode {b['decode_tok_s'] / h['decode_tok_s']:.2f}x, "
                  f"TTFT {h['ttft_ms'] / b['ttft_ms']:.2f}x faster")
    results["setup"] = {"model": str(a.model), "threads": a.threads, "prompt_len": a.prompt_len,
                        "new_tokens": a.new, "dtype": a.dtype, "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine(),
                        "date": time.strftime("%Y-%m-%d %H:%M")}
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    engine.close()


if __name__ == "__main__":
    main()
