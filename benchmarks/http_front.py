"""What Baton's HTTP front costs an HTTP client: the same requests to a node with the front
(`http_front = true`) and to one where tritonserver answers the port itself, alternating, in one run.

    python benchmarks/http_front.py --model models/baton-tiny --out benchmarks/results/http-front-baton-tiny-2cpu.json

One client, requests one after another (an idle server: the front's latency, not its throughput):
generate_stream with 16 new tokens (TTFT: the first event; E2E: the last) and generate (E2E)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from pathlib import Path


def stream_once(host: str, port: int, body: bytes) -> tuple[float, float]:
    c = http.client.HTTPConnection(host, port, timeout=60)
    t0 = time.perf_counter()
    c.request("POST", "/v2/models/llm/generate_stream", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    ttft = None
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data:") and ttft is None:
            ttft = time.perf_counter() - t0
    c.close()
    return ttft or float("nan"), time.perf_counter() - t0


def generate_once(host: str, port: int, body: bytes) -> float:
    c = http.client.HTTPConnection(host, port, timeout=60)
    t0 = time.perf_counter()
    c.request("POST", "/v2/models/llm/generate", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    c.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/baton-tiny")
    ap.add_argument("--out", default=None)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2, help="front / no front alternations")
    a = ap.parse_args()
    from baton.backends.serving.launcher import Node

    body = json.dumps({"text_input": "def fibonacci(n):", "max_tokens": 16, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    samples: dict[str, dict[str, list[float]]] = {m: {"ttft": [], "stream_e2e": [], "generate_e2e": []}
                                                  for m in ("front", "triton")}
    for _ in range(a.rounds):
        for mode in ("front", "triton"):
            node = Node(a.model, "single_node", overrides={"http_front": mode == "front"}, gateway_port=None)
            node.start(timeout=300, quiet=True)
            try:
                host, port = node.http_url.split(":")
                for _ in range(3):                       # warm-up
                    stream_once(host, int(port), body)
                s = samples[mode]
                for _ in range(a.requests):
                    ttft, e2e = stream_once(host, int(port), body)
                    s["ttft"].append(ttft)
                    s["stream_e2e"].append(e2e)
                    s["generate_e2e"].append(generate_once(host, int(port), body))
            finally:
                node.stop()
    report: dict = {"model": a.model, "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "requests_per_mode": a.requests * a.rounds, "ms": {}}
    for mode, s in samples.items():
        report["ms"][mode] = {k: round(1e3 * statistics.median(v), 2) for k, v in s.items()}
    report["front_over_triton"] = {k: round(report["ms"]["front"][k] / report["ms"]["triton"][k], 3)
                                   for k in report["ms"]["front"]}
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
