"""Speculative decoding against no speculation, measured in the same run, in-process and through
Triton (a node per method, beside a node without speculation; requests alternate between the two).

    python benchmarks/spec.py [--model models/baton-tiny] [--modes inproc,triton]
                              [--methods ngram,draft,medusa,eagle] [--conc 1,4,16] [--temps 0,0.8]
                              [--workloads completion,edit] [--new 256] [--requests 12] [--rounds 2]
                              [--out FILE]

Workloads, from the held-out files of baton-tiny's corpus (stdlib sources the family never trained on):
  completion  a 256-token prompt starting at a top-level `def`/`class`; 256 new tokens
  edit        a held-out function, then a comment asking for it again under a new name and the new
              `def` line: the answer repeats most of the prompt (the case prompt lookup is for)
Each cell (workload x temperature x concurrency) sends max(requests, c) requests (the workload's
first prompts), c at a time; tokens/s is completion tokens over the cell's wall time, median of the
rounds; acceptance length is 1 + accepted drafts per verifying step, median of the rounds. Three
requests per cell (the default until 2026-12-01) made a cell's ratio hinge on three prompts: EAGLE's
acceptance on the first three completion prompts is 2.6, over the first 24 it is 3.1. In-process, "concurrency c" is c prompts in one generate() call. Methods
use the repository's profiles spec_<method> (draft_vocab = 2048; k = 3, ngram 4, draft 5); through
Triton `draft` is the `draft` stage, called over its node-local socket, `draft_grpc` the same stage
called through tritonserver's gRPC endpoint (`[serving] draft_channel = "grpc"`), `draft_2threads`
the stage with two torch threads (`draft_threads = 2`), `draft_inline` the draft model inside decode
(in-process they are all the same, so only `draft` runs in-process), `none` a second plain node (an
A/A control: the arms' ratio without speculation; in-process a second plain engine). Within a cell the two arms alternate, and which
goes first alternates by round; `paired_speedup` is the median of each round's own ratio.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import threading
import time
from pathlib import Path

from baton.backends.runtime import configure_process  # isort: skip

configure_process()

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from baton import LLM, SamplingParams  # noqa: E402
from baton.backends.serving.config import Profile  # noqa: E402

METHODS = ("ngram", "draft", "draft_inline", "medusa", "eagle")    # profiles spec_<method>
# through Triton only: a method run on another method's profile with serving keys changed
VARIANTS = {"draft_grpc": ("draft", {"draft_channel": "grpc"}), "draft_2threads": ("draft", {"draft_threads": 2}),
            **{f"draft_k{k}": ("draft", {"speculative": {"method": "draft", "num_speculative_tokens": k, "draft_vocab": 2048,
                                                          "model": "models/baton-tiny-draft"}}) for k in (4, 5)},
            "none": (None, {})}     # an A/A control: a second plain node, started as the methods' nodes are


def heldout_texts() -> list[str]:
    from baton.tools.train.corpus import read_split

    return read_split(5).heldout


def definitions(texts: list[str]) -> list[str]:
    """Top-level functions and classes of the held-out files, whole (to the next top-level line)."""
    out = []
    for t in texts:
        for m in re.finditer(r"^(def|class) \w+.*?(?=^\S|\Z)", t, re.S | re.M):
            out.append(m.group(0).rstrip() + "\n")
    return out


def workloads(tok, new: int) -> dict[str, list[str]]:  # noqa: ANN001
    defs = definitions(heldout_texts())
    completion = []
    for d in defs:
        ids = tok.encode(d)
        if len(ids) >= 256:
            completion.append(tok.decode(ids[:256]))
    edit = []
    for d in defs:
        n = len(tok.encode(d))
        name = re.match(r"(?:def|class) (\w+)", d).group(1)
        if d.startswith("def ") and 120 <= n <= 400 and not name.startswith("_"):
            renamed = re.sub(rf"\b{name}\b", f"{name}_v2", d)
            edit.append(d + f"\n\n# {name}_v2: the same function as {name}, renamed\n" + renamed.split("(", 1)[0] + "(")
    return {"completion": completion, "edit": edit}


def params(temp: float, new: int, i: int) -> dict:
    return {"temperature": temp, "max_tokens": new, "ignore_eos": True} | ({"seed": 1000 + i} if temp else {})


# ---- in-process ---------------------------------------------------------------------------------

def spec_table(method: str) -> dict:
    return Profile.load(f"spec_{method}").engine["speculative"]


def inproc_cell(llm: LLM, prompts: list[str], temp: float, new: int, conc: int, n: int) -> dict:
    ps = [prompts[i % len(prompts)] for i in range(n)]
    sps = [SamplingParams(**params(temp, new, i)) for i in range(n)]
    t = time.perf_counter()
    outs = []
    for i in range(0, n, conc):
        outs += llm.generate(ps[i:i + conc], sps[i:i + conc])
    wall = time.perf_counter() - t
    toks = sum(len(o.token_ids) for o in outs)
    steps = sum(o.num_spec_steps for o in outs)
    return {"tok_s": toks / wall, "acc_len": 1 + sum(o.num_accepted_tokens for o in outs) / steps if steps else 1.0,
            "tokens": [o.token_ids for o in outs]}


# ---- through Triton -------------------------------------------------------------------------------

def triton_cell(url: str, prompts: list[str], temp: float, new: int, conc: int, n: int) -> dict:
    from baton_client import BatonClient

    todo = [(i, prompts[i % len(prompts)]) for i in range(n)]      # past the workload: around again
    results: dict[int, object] = {}
    lock = threading.Lock()

    def worker() -> None:
        client = BatonClient(url)
        while True:
            with lock:
                if not todo:
                    return
                i, p = todo.pop(0)
            results[i] = client.generate(p, **params(temp, new, i))

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    outs = [results[i] for i in range(n)]
    toks = sum(len(o.token_ids) for o in outs)
    spec = [o.speculative_tokens or [0, 0, 0] for o in outs]
    steps = sum(s[2] for s in spec)
    return {"tok_s": toks / wall, "acc_len": 1 + sum(s[1] for s in spec) / steps if steps else 1.0,
            "tokens": [o.token_ids for o in outs]}


class Nodes:
    def __init__(self, model: str, max_len: int) -> None:
        self.model, self.max_len = model, max_len

    def start(self, profile: str, extra: dict | None = None):  # noqa: ANN201
        from baton.backends.serving.launcher import Node

        n = Node(self.model, profile, overrides={"max_model_len": self.max_len, "kv_cache_memory_mb": 256} | (extra or {}))
        n.start(timeout=300, quiet=True)
        return n


# ---- the run ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "baton-tiny"))
    ap.add_argument("--modes", default="inproc,triton")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--conc", default="1,4,16")
    ap.add_argument("--temps", default="0,0.8")
    ap.add_argument("--workloads", default="completion,edit")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--requests", type=int, default=12, help="requests per cell (at least the concurrency)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    methods = a.methods.split(",")
    concs = [int(c) for c in a.conc.split(",")]
    temps = [float(t) for t in a.temps.split(",")]
    max_len = 1024
    result = {"model": a.model, "new": a.new, "rounds": a.rounds, "requests": a.requests, "started": time.strftime("%Y-%m-%d %H:%M"),
              "rows": []}

    base = LLM(a.model, max_model_len=max_len, kv_cache_memory_mb=256)
    loads = workloads(base.engine.tokenizer, a.new)
    loads = {w: loads[w] for w in a.workloads.split(",")}
    print({w: len(p) for w, p in loads.items()}, "prompts per workload", flush=True)

    def measure(mode: str, method: str, run_off, run_on) -> None:  # noqa: ANN001
        for w, prompts in loads.items():
            for temp in temps:
                for c in concs:
                    off, on, accs = [], [], []
                    n = max(a.requests, c)
                    run_off(prompts, temp, a.new, c, c), run_on(prompts, temp, a.new, c, c)     # warm up
                    same = None
                    for r in range(a.rounds):
                        if r % 2 == 0:
                            x, y = run_off(prompts, temp, a.new, c, n), run_on(prompts, temp, a.new, c, n)
                        else:
                            y, x = run_on(prompts, temp, a.new, c, n), run_off(prompts, temp, a.new, c, n)
                        off.append(x["tok_s"])
                        on.append(y["tok_s"])
                        accs.append(y["acc_len"])
                        if temp == 0 and same is None:
                            same = x["tokens"] == y["tokens"]
                    acc = statistics.median(accs)
                    row = {"mode": mode, "method": method, "workload": w, "temperature": temp, "concurrency": c,
                           "off_tok_s": statistics.median(off), "on_tok_s": statistics.median(on),
                           "acceptance_length": acc, "identical_tokens": same, "runs": {"off": off, "on": on}}
                    row["speedup"] = row["on_tok_s"] / row["off_tok_s"]
                    # the median of each round's own ratio: the arms of a round ran minutes apart at most,
                    # so a slow phase of the box moves both
                    row["paired_speedup"] = statistics.median(y / x for x, y in zip(off, on))
                    result["rows"].append(row)
                    print(f"{mode:7s} {method:7s} {w:10s} T={temp:.1f} c={c:2d}: off {row['off_tok_s']:7.1f} "
                          f"on {row['on_tok_s']:7.1f} tok/s ({row['speedup']:.2f}x, paired {row['paired_speedup']:.2f}x), "
                          f"acceptance length {acc:.2f}"
                          + (f", identical {same}" if same is not None else ""), flush=True)
                    if a.out:
                        Path(a.out).write_text(json.dumps(result, indent=1))

    if "inproc" in a.modes:
        for method in [m for m in methods if m == "none" or (m != "draft_inline" and m not in VARIANTS)]:
            spec = LLM(a.model, max_model_len=max_len, kv_cache_memory_mb=256,
                       speculative_config=spec_table(method) if method != "none" else None)
            measure("inproc", method, lambda *x: inproc_cell(base, *x), lambda *x, spec=spec: inproc_cell(spec, *x))
            spec.close()
    base.close()
    if "triton" in a.modes:
        nodes = Nodes(a.model, max_len)
        off = nodes.start("single_node")
        try:
            for method in methods:
                base_method, extra = VARIANTS.get(method, (method, {}))
                on = nodes.start(f"spec_{base_method}" if base_method else "single_node", extra)
                try:
                    measure("triton", method, lambda *x: triton_cell(off.grpc_url, *x),
                            lambda *x, on=on: triton_cell(on.grpc_url, *x))
                finally:
                    on.stop()
        finally:
            off.stop()
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
