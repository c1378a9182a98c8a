"""Quantization: quality on baton-tiny, speed and memory on a larger random checkpoint, each form
against bf16 measured in the same run.

    python benchmarks/quant.py quality [--model models/baton-tiny] [--out FILE]
    python benchmarks/quant.py speed   [--model /path/to/medium] [--repeats 3] [--out FILE]
    python benchmarks/quant.py kv      [--model /path/to/medium] [--kv-mb 2048] [--out FILE]
    python benchmarks/quant.py kernels [--out FILE]

quality  perplexity of the fixed held-out slice (models/heldout-slice.txt, 8 x 512 tokens, teacher
         forced through the engine: backends/engine/scoring.py) and top-1 agreement with bf16, for
         each weight format and KV cache dtype.
speed    batch-1 and batch-8 greedy decode tok/s, TTFT of one 128-token prompt, and the bytes of the
         weights the engine runs on (each storage once), bf16 against each weight form;
         forms alternate per repeat so they share the machine's minutes.
kv       the pool's blocks in the same memory, and throughput with 32 requests of 768-token prompts
         and 256 new tokens (contexts grow to 1,024) submitted at once: output tok/s over the run,
         and decode tok/s over the steps that only decode. bf16 KV against int8 and fp8.
kernels  one decode step's GEMMs of `medium` (28 layers of distinct weights, so they stream from
         DRAM as in decode) at 1, 8 and 64 rows: Baton's bf16 kernel, Baton's int8 kernel and torch's
         _weight_int8pack_mm (the measured comparison behind the int8 CPU kernel).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

from baton.backends.runtime import configure_process  # isort: skip

configure_process()

import torch  # noqa: E402
from engine import baton_run as run  # noqa: E402 (benchmarks/engine.py: greedy TTFT and decode tok/s)
from engine import prompts  # noqa: E402

from baton import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "quantized"
# weight forms: engine arguments, or a checkpoint written by tools/quantize_rtn.py (format, group, sym, bits
# [, lm_head quantized too])
WEIGHT_FORMS: dict[str, dict | tuple] = {
    "bf16": {}, "int8": {"quantization": "int8"},
    "gptq-rtn int4 g128": ("gptq", 128, True, 4), "gptq-rtn int4 g128 + lm_head": ("gptq", 128, True, 4, True),
    "awq-rtn int4 g128": ("awq", 128, False, 4),
    "compressed-tensors-rtn w4a16 g128": ("compressed-tensors", 128, True, 4),
    "compressed-tensors-rtn w8a16": ("compressed-tensors", 0, True, 8),
}
SPEED_FORMS = ("bf16", "int8", "gptq-rtn int4 g128", "gptq-rtn int4 g128 + lm_head")
KV_FORMS = {"bf16": "auto", "int8": "int8", "fp8": "fp8"}


def engine_args(model: Path, form: str) -> dict:
    """EngineConfig fields for a weight form (writing its quantized checkpoint once, if it has one)."""
    spec = WEIGHT_FORMS[form]
    if isinstance(spec, dict):
        return {"model": str(model)} | spec
    from baton.tools.quantize_rtn import quantize_checkpoint

    fmt, group, sym, bits, *head = spec
    lm_head = bool(head and head[0])
    out = CACHE / f"{model.name}-{fmt}-g{group}-{'sym' if sym else 'asym'}-{bits}bit{'-lm_head' if lm_head else ''}"
    if not (out / "config.json").is_file():
        quantize_checkpoint(model, out, fmt, group, sym, bits, lm_head)
    return {"model": str(out)}


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes of the weights the engine's model runs on (each distinct storage counted once)."""
    seen: dict[int, int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif t is not None:
            for name in ("weight", "bias", "_blob", "w", "qweight", "scale", "sz", "qzeros", "scales"):
                add(getattr(t, name, None))

    m = engine.model
    for L in m.layers:
        for x in (L.input_norm, L.qkv, L.qk_norm, L.o, L.post_norm, L.gate_up, L.down):
            add(x)
    for x in (m.embed, m.norm, m.lm_head):
        add(x)
    return sum(seen.values())


def setup(a: argparse.Namespace) -> dict:
    return {"model": str(a.model), "threads": a.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}


# ---- quality -------------------------------------------------------------------------------------
def quality(a: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from baton.backends.engine.scoring import score
    from baton.tools.train.tiny import heldout_slice_windows

    tok = AutoTokenizer.from_pretrained(str(a.model))
    text = (ROOT / "models" / "heldout-slice.txt").read_text(encoding="utf-8")
    windows = [list(map(int, w)) for w in heldout_slice_windows(tok, text, 512, 8)]
    forms = {f"weights {k}": engine_args(a.model, k) for k in WEIGHT_FORMS}
    forms |= {f"weights {Path(p).name}": {"model": p} for p in a.extra}    # e.g. a real producer's checkpoints
    forms |= {f"kv {k}": {"model": str(a.model), "kv_cache_dtype": v} for k, v in KV_FORMS.items() if v != "auto"}
    forms = {"bf16": forms.pop("weights bf16")} | forms
    out, ref = {}, None
    for name, kw in forms.items():
        engine = LLMEngine(EngineConfig(dtype="bfloat16", **kw))
        s = score(engine, windows)
        engine.close()
        ref = ref or s
        out[name] = {"perplexity": round(s.perplexity, 3), "delta_pct": round(100 * (s.perplexity / ref.perplexity - 1), 3),
                     "top1_agreement_with_bf16": round(float((s.argmax == ref.argmax).float().mean()), 4)}
        print(f"{name:40s} perplexity {s.perplexity:8.3f} ({out[name]['delta_pct']:+.2f}%)  "
              f"top-1 agreement {out[name]['top1_agreement_with_bf16']:.4f}", flush=True)
    return {"quality": out, "tokens": s.tokens}


# ---- speed ---------------------------------------------------------------------------------------
def speed(a: argparse.Namespace) -> dict:
    samples: dict[str, dict[str, list[float]]] = {f: {} for f in SPEED_FORMS}
    args = {f: engine_args(a.model, f) for f in SPEED_FORMS}
    for r in range(a.repeats):
        for form in SPEED_FORMS:
            gc.collect()
            engine = LLMEngine(EngineConfig(dtype="bfloat16", enable_prefix_caching=False, kv_cache_memory_mb=256,
                                            **args[form]))
            s = samples[form]
            s.setdefault("weights_mb", []).append(weight_bytes(engine) / 2**20)
            vocab = engine.config.vocab_size
            run(engine, prompts(1, 16, vocab, 0), 4)                              # warm-up
            ttft, b1 = run(engine, prompts(1, 128, vocab, 10 + r), a.new)
            _, b8 = run(engine, prompts(8, 128, vocab, 20 + r), a.new)
            for k, v in (("ttft_ms", 1000 * ttft), ("batch1_tok_s", b1), ("batch8_tok_s", b8)):
                s.setdefault(k, []).append(v)
            print(f"round {r} {form:18s}: TTFT {1000 * ttft:6.1f} ms  batch 1 {b1:6.1f} tok/s  batch 8 {b8:6.1f} tok/s  "
                  f"weights {s['weights_mb'][-1]:6.0f} MiB", flush=True)
            engine.close()
            del engine
    out = {f: {k: round(statistics.median(v), 2) for k, v in s.items()} | {"runs": s} for f, s in samples.items()}
    base = out["bf16"]
    for f in SPEED_FORMS:
        if f != "bf16":
            o = out[f]
            o["vs_bf16"] = {"batch1": round(o["batch1_tok_s"] / base["batch1_tok_s"], 3),
                            "batch8": round(o["batch8_tok_s"] / base["batch8_tok_s"], 3),
                            "ttft": round(base["ttft_ms"] / o["ttft_ms"], 3),
                            "weights_memory": round(o["weights_mb"] / base["weights_mb"], 3)}
            print(f"{f}: {o['vs_bf16']}", flush=True)
    return {"speed": out, "new_tokens": a.new, "repeats": a.repeats}


# ---- KV cache ------------------------------------------------------------------------------------
def kv(a: argparse.Namespace) -> dict:
    out: dict[str, dict] = {}
    for r in range(a.repeats):
        for form, kv_dtype in KV_FORMS.items():
            engine = LLMEngine(EngineConfig(model=str(a.model), dtype="bfloat16", enable_prefix_caching=False,
                                            kv_cache_memory_mb=a.kv_mb, kv_cache_dtype=kv_dtype, max_num_seqs=32))
            vocab = engine.config.vocab_size
            run(engine, prompts(1, 16, vocab, 0), 4)
            sp = SamplingParams(temperature=0, max_tokens=a.new, ignore_eos=True)
            decode_steps: list[tuple[int, float]] = []
            last: list = []
            schedule = engine.scheduler.schedule

            def recorded(schedule=schedule, last=last):  # noqa: ANN001, ANN202 (the step's rows, for the split)
                last[:] = schedule()
                return list(last)

            engine.scheduler.schedule = recorded
            t0 = time.perf_counter()
            for p in prompts(32, a.prompt_len, vocab, 100 + r):
                engine.add_request(p, sp)
            while engine.has_unfinished():
                ts = time.perf_counter()
                engine.step()
                if last and all(n == 1 for _, n in last):
                    decode_steps.append((len(last), time.perf_counter() - ts))
            wall = time.perf_counter() - t0
            o = out.setdefault(form, {"num_blocks": engine.pool.spec.num_blocks, "runs": []})
            dec_tokens = sum(n for n, _ in decode_steps)
            dec_time = sum(t for _, t in decode_steps)
            o["runs"].append({"output_tok_s": 32 * a.new / wall, "decode_tok_s": dec_tokens / dec_time if dec_time else 0,
                              "wall_s": wall, "preemptions": engine.scheduler.num_preemptions})
            print(f"round {r} kv {form:5s}: {engine.pool.spec.num_blocks} blocks  output {32 * a.new / wall:6.1f} tok/s  "
                  f"decode-only steps {o['runs'][-1]['decode_tok_s']:6.1f} tok/s  wall {wall:5.1f} s  "
                  f"preemptions {engine.scheduler.num_preemptions}", flush=True)
            engine.close()
            del engine
            gc.collect()
    for o in out.values():
        for k in ("output_tok_s", "decode_tok_s", "wall_s"):
            o[k] = round(statistics.median(x[k] for x in o["runs"]), 2)
    base = out["bf16"]
    for form, o in out.items():
        if form != "bf16":
            o["vs_bf16"] = {"blocks": round(o["num_blocks"] / base["num_blocks"], 3),
                            "output_throughput": round(o["output_tok_s"] / base["output_tok_s"], 3),
                            "decode_throughput": round(o["decode_tok_s"] / base["decode_tok_s"], 3)}
            print(f"kv {form}: {o['vs_bf16']}", flush=True)
    return {"kv": out, "kv_cache_memory_mb": a.kv_mb, "requests": 32, "prompt_len": a.prompt_len, "new_tokens": a.new}


# ---- kernels -------------------------------------------------------------------------------------
def kernels(a: argparse.Namespace) -> dict:
    from baton.kernels.int4_linear import Int4Data, Int4Linear, Int4LinearMethod
    from baton.kernels.int8_linear import Int8Linear, Int8Weight
    from baton.kernels.linear import LinearMethod, LinearWeight, linear
    from baton.tools.quantize_rtn import rtn_int4

    shapes = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)] * 28     # medium's layer GEMMs
    bf, i8, i8_torch, i4, i4_torch = [], [], [], [], []
    on_kernel, on_torch = Int4LinearMethod(torch.bfloat16, "cpu", LinearMethod()), \
        Int4LinearMethod(torch.float32, "cpu", LinearMethod())
    for n, k in shapes:
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        bf.append(LinearWeight(w, None, pack=True, keep_weight=False))
        i8.append(Int8Linear(Int8Weight.quantize(w, packed=True), None))
        i8_torch.append(Int8Linear(Int8Weight.quantize(w, packed=False), None))
        q, zero, scale = rtn_int4(w, 128, True)
        d = Int4Data(q.to(torch.uint8), zero.to(torch.uint8), scale, 128)
        i4.append(on_kernel.create(d))
        i4_torch.append(on_torch.create(d))
    assert all(isinstance(x, Int4Linear) for x in i4 + i4_torch)
    nbytes = sum(n * k for n, k in shapes)
    out = {}
    for m in (1, 8, 64):
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in (1024, 2048, 3072)}
        row = {}
        for name, ws in (("bf16_baton", bf), ("int8_baton", i8), ("int8_torch_weight_int8pack_mm", i8_torch),
                         ("int4_g128_baton", i4), ("int4_g128_torch_weight_int4pack_mm", i4_torch)):
            for w in ws:                                     # warm-up
                linear(xs[w.in_features], w)
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                for w in ws:
                    linear(xs[w.in_features], w)
                times.append(time.perf_counter() - t)
            ms = 1000 * statistics.median(times)
            gbs = nbytes * {"bf16": 2, "int8": 1, "int4": 0.5}[name[:4]] / (ms / 1000) / 1e9
            row[name] = {"ms": round(ms, 2), "weight_GB_s": round(gbs, 1)}
        out[f"rows{m}"] = row
        print(f"{m:3d} rows: " + "  ".join(f"{k} {v['ms']:.1f} ms ({v['weight_GB_s']} GB/s)" for k, v in row.items()),
              flush=True)
    return {"kernels": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["quality", "speed", "kv", "kernels"])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=768)
    ap.add_argument("--kv-mb", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--extra", nargs="*", default=[], help="quality: more quantized checkpoints of the model")
    a = ap.parse_args()
    if a.model is None:
        a.model = ROOT / "models" / "baton-tiny" if a.what == "quality" else ROOT / ".cache" / "checkpoints" / "medium"
    torch.set_num_threads(a.threads)
    result = {"quality": quality, "speed": speed, "kv": kv, "kernels": kernels}[a.what](a) | {"setup": setup(a)}
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
