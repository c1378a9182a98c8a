"""Alternating A/B of benchmarks/engine.py between two checkouts (each with its own .venv), in the
same minutes: decode tok/s at batch 1 and 8 and TTFT, per round and as medians with the B/A ratio.

    python benchmarks/ab_engine.py --a /path/to/before --b . --model .cache/checkpoints/small --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def run(tree: Path, model: str, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([str(tree / ".venv" / "bin" / "python"), str(tree / "benchmarks" / "engine.py"), "--model", model,
                        "--threads", str(threads), "--skip-hf", "--out", f.name], check=True, cwd=tree,
                       stdout=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())["baton"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", required=True, help="checkout B")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    trees = {"a": Path(a.a).resolve(), "b": Path(a.b).resolve()}
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for r in range(a.rounds):
        for name in (("a", "b") if r % 2 == 0 else ("b", "a")):      # alternate who goes first
            res = run(trees[name], a.model, a.threads)
            runs[name].append(res)
            print(f"round {r} {name}: b1 {res['batch1']['decode_tok_s']:.1f} tok/s, b8 {res['batch8']['decode_tok_s']:.1f} "
                  f"tok/s, TTFT {res['batch1']['ttft_ms']:.1f} ms", flush=True)
    summary = {}
    for key, metric in (("batch1", "decode_tok_s"), ("batch8", "decode_tok_s"), ("batch1", "ttft_ms")):
        med = {n: statistics.median(x[key][metric] for x in runs[n]) for n in runs}
        summary[f"{key}_{metric}"] = {"a": med["a"], "b": med["b"], "b_over_a": med["b"] / med["a"]}
        print(f"{key} {metric}: A {med['a']:.1f}  B {med['b']:.1f}  B/A {med['b'] / med['a']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "model": a.model,
                                           "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs,
                                           "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
