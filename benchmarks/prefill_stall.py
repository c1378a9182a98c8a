"""What a long prompt does to a live stream under each core-sharing policy: a 250-token greedy stream
runs, a ~1080-token prompt arrives 0.4 s later; reports the long prompt's TTFT and the live stream's
longest gap between tokens. One server per policy, all up at once, taking turns.

    python benchmarks/prefill_stall.py [--model .cache/checkpoints/small] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from baton.backends.runtime import configure_process  # isort: skip

configure_process()  # before torch loads: OpenMP workers spin as in serving

from baton.backends.serving.launcher import Node
from baton_client import BatonClient

POLICIES = {"fair": {"share_cores_policy": "fair"},
            "prefill_first, 256-token chunks, no decode_wait": {"share_cores_policy": "prefill_first",
                                                                 "prefill_chunk_tokens": 256, "decode_wait_ms": 0},
            **{f"prefill_first, 256-token chunks, decode_wait {ms} ms": {"share_cores_policy": "prefill_first",
                                                                        "prefill_chunk_tokens": 256,
                                                                        "decode_wait_ms": ms} for ms in (10, 25)},
            "prefill_first, whole prompt, decode_wait 10 ms": {"share_cores_policy": "prefill_first",
                                                              "prefill_chunk_tokens": 0, "decode_wait_ms": 10}}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def one(client: BatonClient, tag: str) -> tuple[float, float]:
    """(long prompt's TTFT, live stream's longest gap), seconds."""
    live: list[float] = []

    def stream() -> None:
        for _ in client.stream(f"live {tag}: hello world", max_tokens=250, temperature=0.0, ignore_eos=True):
            live.append(time.perf_counter())

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.4)
    prompt = f"{tag} " + " ".join(WORDS[(i * 7 + len(tag)) % len(WORDS)] for i in range(480))
    t0 = time.perf_counter()
    chunks = client.stream(prompt, max_tokens=1)
    next(iter(chunks))
    ttft = time.perf_counter() - t0
    for _ in chunks:
        pass
    t.join()
    return ttft, max(b - a for a, b in zip(live, live[1:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/checkpoints/small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    nodes: dict[str, Node] = {}
    try:
        for name, o in POLICIES.items():
            nodes[name] = Node(a.model, profile="single_node_direct", overrides={"max_model_len": 2048} | o).start(quiet=True)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in nodes}
        for r in range(a.repeats):
            for name, node in nodes.items():
                with BatonClient(node.grpc_url) as client:
                    runs[name].append(one(client, f"{r} {name}"))
    finally:
        for node in nodes.values():
            node.stop()
    rows = []
    for name, xs in runs.items():
        ttft, gap = statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)
        rows.append({"policy": name, "ttft_ms": 1e3 * ttft, "longest_gap_ms": 1e3 * gap,
                     "runs_ms": [[round(1e3 * t), round(1e3 * g)] for t, g in xs]})
        print(f"{name:55s} long-prompt TTFT {1e3 * ttft:6.0f} ms   live stream's longest gap {1e3 * gap:6.0f} ms",
              flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "model": a.model, "date": time.strftime("%Y-%m-%d %H:%M")},
                                          indent=2))


if __name__ == "__main__":
    main()
