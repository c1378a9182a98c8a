"""What work on one core costs decode on the other, through the hardware alone (shared caches, memory
bandwidth, or SMT siblings on a VM's vCPUs): the engine decodes pinned to CPU 0, one thread, while
CPU 1 runs nothing, an ALU loop, a 1024x1024 fp32 matmul loop (what the vision tower's GEMMs are), or
a 256 MiB copy loop (memory bandwidth). The loads alternate, `--rounds` times. No OS scheduling is
involved (each process has its core to itself), so this bounds what pinning the encoder to a core of
its own can give the text streams on such a box.

    python benchmarks/core_contention.py --model .cache/checkpoints/small --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOADS = {
    "none": None,
    "alu": "x = 0\nwhile True: x = (x * 3 + 1) % 1000003",
    "sgemm": "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True: a @ a",
    "memory": "import torch\ntorch.set_num_threads(1)\na = torch.randn(64 << 20)\nb = torch.empty_like(a)\n"
              "while True: b.copy_(a)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=".cache/checkpoints/small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.sched_setaffinity(0, {0})
    from baton import LLM, SamplingParams

    llm = LLM(a.model, dtype=a.dtype, max_model_len=512, kv_cache_memory_mb=256, threads=1)
    sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)

    def tok_per_s() -> float:
        t = time.perf_counter()
        llm.generate(["hello world"] * a.batch, sp)
        return a.tokens * a.batch / (time.perf_counter() - t)

    tok_per_s()                                      # warm up
    runs: dict[str, list[float]] = {k: [] for k in LOADS}
    for _ in range(a.rounds):
        for name, code in LOADS.items():
            load = None
            if code:
                load = subprocess.Popen([sys.executable, "-c", "import os\nos.sched_setaffinity(0, {1})\n" + code])
                time.sleep(1.5)                      # imported and running
            try:
                runs[name].append(tok_per_s())
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
    llm.close()
    base = statistics.median(runs["none"])
    report = {"model": a.model, "dtype": a.dtype, "batch": a.batch, "cpus": os.cpu_count(),
              "decode_tok_per_s": runs, "median_over_idle": {k: statistics.median(v) / base for k, v in runs.items()}}
    for k, v in runs.items():
        print(f"CPU 1 {k:>6}: decode {statistics.median(v):6.1f} tok/s, {report['median_over_idle'][k]:.2f}x idle")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
