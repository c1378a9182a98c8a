"""The most EPD can gain over monolithic on this box, from the work alone: one process, no server.

EPD splits the same work over the cores (the tower on one, the language model on the other), each
single-threaded; monolithic runs it all on every core. Past saturation both are CPU-bound, so EPD's
throughput over mono's is at most the ratio of the core-seconds each spends on one workload:

    bound = (cores x wall, everything on `cores` threads) / (tower on 1 thread + language model on 1 thread)

(EPD reaches it only if its split keeps every core busy; serving overheads are the same in both.)
The workload is benchmarks/epd.py's: half text chat turns, half one new 448x448 image plus such a
question, `--max-tokens` tokens each, all submitted at once to the offline engine. The arms
alternate in one process; every round uses new images and new questions (no cache hits).

    python benchmarks/epd_bound.py --model .cache/checkpoints/small-qwen2.5-vl --dtype bfloat16 \
        --out benchmarks/results/epd-bound-small-vl-2cpu-avx2-bf16.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from baton import LLM, SamplingParams


def png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def question(rng: random.Random) -> str:
    words = "what where which show list explain compare describe count colour shape left right top bottom".split()
    return " ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) + "?"


def workload(tok, n: int, seed: int) -> list[dict]:  # noqa: ANN001 - a transformers tokenizer
    rng, out = random.Random(seed), []
    for i in range(n):
        image = i % 2 == 1
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question(rng)}]
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
        out.append({"prompt": prompt, "multi_modal_data": {"image": png(448, seed * 1000 + i)}} if image
                   else {"prompt": prompt})
    return out


def timed(fn, *args) -> float:  # noqa: ANN001, ANN002 - any call
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from transformers import AutoTokenizer  # the checkpoint's chat template

    tok = AutoTokenizer.from_pretrained(a.model)
    llm = LLM(a.model, dtype=a.dtype, max_model_len=2048, kv_cache_memory_mb=256)
    enc = llm.engine.encoder
    assert enc is not None, "not a vision-language checkpoint"
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(workload(tok, 4, 999), sp)                         # warm up both paths
    rows: list[dict] = []
    for r in range(a.rounds):
        row: dict[str, float] = {}
        for threads in (a.cores, 1):
            torch.set_num_threads(threads)
            # everything together (what mono does: the tower inside prefill, beside decode)
            reqs = workload(tok, a.requests, 10 * r + threads)
            row[f"together_{threads}t_s"] = timed(llm.generate, reqs, sp)
            # the same kind of work apart: the tower first (into the engine's embedding cache), then the
            # language model alone (its image requests find their embeddings cached)
            reqs = workload(tok, a.requests, 10 * r + threads + 5)
            images = [enc.processor(q["multi_modal_data"]["image"]) for q in reqs if "multi_modal_data" in q]
            row[f"tower_{threads}t_s"] = timed(enc.encode, images)
            row[f"lm_{threads}t_s"] = timed(llm.generate, reqs, sp)
        row["mono_core_s"] = a.cores * row[f"together_{a.cores}t_s"]
        row["epd_core_s"] = row["tower_1t_s"] + row["lm_1t_s"]
        row["bound"] = row["mono_core_s"] / row["epd_core_s"]
        rows.append(row)
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    summary = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
    result = {"model": a.model, "dtype": a.dtype, "requests": a.requests, "max_tokens": a.max_tokens,
              "cores": a.cores, "rounds": rows, "median": summary,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print("median:", json.dumps({k: round(v, 3) for k, v in summary.items()}))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
