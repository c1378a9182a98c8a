"""Speculative decoding A/B on the in-process engine: the same greedy requests with and without
prompt-lookup drafts, alternating in the same process, so the ratio is what the numbers mean.

    python benchmarks/spec.py --model models/baton-tiny [--k 4] [--rounds 3] [--batch 1,8] [--new 128]
                              [--max-batch N]

Prompts: Python source taken from the standard library (code repeats its own identifiers, the case
prompt lookup is for), so the output tokens are the model's, greedy. Reports tok/s per arm, the
speedup, and the acceptance rate (accepted / drafted) and mean tokens per step of the spec arm.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

from baton.backends.runtime import configure_process  # isort: skip

configure_process()

import textwrap  # noqa: E402

from baton import LLM, SamplingParams  # noqa: E402


def prompts(n: int) -> list[str]:
    import json as j
    import shutil

    srcs = [inspect.getsource(f) for f in (j.dumps, shutil.copyfile, textwrap.wrap, inspect.getsource,
                                           argparse.ArgumentParser.add_argument, statistics.median)]
    # each prompt: a function and the start of a near-copy of it (a refactor / edit task)
    out = []
    for i in range(n):
        s = srcs[i % len(srcs)][:1200]
        out.append(s + "\n\n# the same function, renamed\n" + s[:200].replace("def ", "def new_", 1))
    return out


def run(llm: LLM, ps: list[str], new: int) -> tuple[float, int]:
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(ps, sp)
    return time.perf_counter() - t, sum(len(o.token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/baton-tiny")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-batch", type=int, default=None, help="speculative_max_batch (default: the engine's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    kw = dict(dtype=a.dtype, max_model_len=2048, kv_cache_memory_mb=256)
    base = LLM(a.model, **kw)
    extra = {} if a.max_batch is None else {"speculative_max_batch": a.max_batch}
    spec = LLM(a.model, speculative_method="ngram", num_speculative_tokens=a.k, **kw, **extra)
    result = {"model": a.model, "k": a.k, "new": a.new, "rows": []}
    for b in map(int, a.batch.split(",")):
        ps = prompts(b)
        run(base, ps, 8), run(spec, ps, 8)                          # warm up (kernels, allocator)
        rates = {"plain": [], "ngram": []}
        stats0 = dict(spec.engine.spec_stats)
        same = None
        for _ in range(a.rounds):
            for name, llm in (("plain", base), ("ngram", spec)):
                s, n = run(llm, ps, a.new)
                rates[name].append(n / s)
            if same is None:
                sp = SamplingParams(temperature=0.0, max_tokens=a.new, ignore_eos=True)
                same = [o.token_ids for o in base.generate(ps, sp)] == [o.token_ids for o in spec.generate(ps, sp)]
        drafted = spec.engine.spec_stats["drafted"] - stats0["drafted"]
        accepted = spec.engine.spec_stats["accepted"] - stats0["accepted"]
        row = {"batch": b, "plain_tok_s": statistics.median(rates["plain"]),
               "ngram_tok_s": statistics.median(rates["ngram"]), "runs": rates,
               "acceptance": accepted / drafted if drafted else 0.0, "same_tokens": same}
        row["speedup"] = row["ngram_tok_s"] / row["plain_tok_s"]
        result["rows"].append(row)
        print(f"batch {b}: plain {row['plain_tok_s']:.1f} tok/s, ngram k={a.k} {row['ngram_tok_s']:.1f} tok/s "
              f"({row['speedup']:.2f}x), acceptance {row['acceptance']:.2f}, identical tokens: {same}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
