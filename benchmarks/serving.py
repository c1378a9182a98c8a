"""Serving benchmark: Poisson arrivals through the `llm` ensemble over gRPC streaming, and the same
workload on the in-process engine, so Triton's cost per token is a measured ratio. Each deployment
profile in --profiles gets its own server (optionally with its own overrides, `profile:key=value`),
all up at once, and the paths take turns.

    python benchmarks/serving.py --model .cache/checkpoints/small [--rates 0.5,1,2,4] [--requests 24]
                                 [--profiles single_node,single_node_direct] [--rounds 1]

Reports TTFT, TPOT (per request: (last - first response) / the tokens after the first response),
ITL (every gap between streamed responses) at P50/P95/P99, output throughput, the idle-server TTFT
of one 128-token prompt, batch-1 decode tok/s, and the KV manager's cost (calls per generated
token, server time per call, RTT).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

from baton.backends.runtime import configure_process  # isort: skip

configure_process()  # before torch loads: OpenMP workers spin as in serving

import torch

from baton import EngineConfig, LLMEngine, SamplingParams
from baton.backends.kv.manager import RemoteBlockManager
from baton.backends.serving.launcher import Node
from baton_client import BatonClient


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def tpot_s(r: dict) -> float | None:
    """(last - first response) / the tokens after the first response: a response may carry several."""
    later = r["n"] - r["counts"][0]
    return (r["times"][-1] - r["times"][0]) / later if later > 0 else None


def summarize(name: str, rate: float, recs: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in recs]
    tpot = [t for t in map(tpot_s, recs) if t is not None]
    itl = [b - a for r in recs for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["n"] for r in recs)
    row = {"path": name, "rate": rate, "requests": len(recs), "tokens": tokens, "throughput_tok_s": tokens / wall}
    for label, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        for p in (50, 95, 99):
            row[f"{label}_p{p}"] = 1000 * pct(xs, p)
    return row


def workload(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 1, (prompt_len,), generator=g).tolist() for _ in range(n)]


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    rnd, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rnd.expovariate(rate) if rate > 0 else 0.0
        out.append(t)
    return out


def server_spec(spec: str) -> tuple[str, dict]:
    """"single_node" or "single_node:key=value:key=value": a profile and that server's own overrides."""
    name, *pairs = spec.split(":")
    own = {}
    for kv in pairs:
        k, v = kv.split("=", 1)
        own[k] = int(v) if v.lstrip("-").isdigit() else v
    return name, own


def run_server(client: BatonClient, tok, prompts: list[list[int]], times: list[float], new: int) -> tuple[list[dict], float]:  # noqa: ANN001, E501
    """Text prompts (the server tokenizes); greedy, EOS ignored. The client keeps one channel open,
    as a long-lived client does."""
    recs: list[dict] = [None] * len(prompts)  # type: ignore[list-item]
    t0 = time.perf_counter()

    def one(i: int) -> None:
        delay = t0 + times[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        start = time.perf_counter()
        stamps, counts = [], []
        for c in client.stream(tok.decode(prompts[i], skip_special_tokens=False), max_tokens=new,
                               temperature=0.0, ignore_eos=True):
            if c.token_ids:
                stamps.append(time.perf_counter())
                counts.append(len(c.token_ids))
        recs[i] = {"ttft": stamps[0] - start, "times": stamps, "counts": counts, "n": sum(counts)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return recs, time.perf_counter() - t0


def run_engine(engine: LLMEngine, prompts: list[list[int]], times: list[float], new: int) -> tuple[list[dict], float]:
    """The same arrivals, stepping the engine in this process."""
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    tok = engine.tokenizer
    recs: dict[int, dict] = {}
    seqs: dict[int, int] = {}
    pending = list(range(len(prompts)))
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and times[pending[0]] <= now:
            i = pending.pop(0)
            s = engine.add_request(tok.encode(tok.decode(prompts[i], skip_special_tokens=False)), sp)
            seqs[s.seq_id] = i
            recs[i] = {"start": time.perf_counter(), "times": [], "counts": []}
        if not engine.has_unfinished():
            time.sleep(max(0.0, times[pending[0]] - (time.perf_counter() - t0)))
            continue
        for o in engine.step():
            r = recs[seqs[o.seq.seq_id]]
            r["times"].append(time.perf_counter())
            r["counts"].append(len(o.new_token_ids))
    for r in recs.values():
        r["ttft"], r["n"] = r["times"][0] - r.pop("start"), sum(r["counts"])
    return [recs[i] for i in range(len(prompts))], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/checkpoints/small")
    ap.add_argument("--rates", default="0.5,1,2,4", help="requests/s; 0: all --requests arrive at once")
    ap.add_argument("--rounds", type=int, default=1, help="runs per rate (new prompts and arrivals each)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="threads per serving stage (0: the profile's)")
    ap.add_argument("--share-cores", default=None,
                    help="threads prefill and decode share by load: auto, N, or 0 for a fixed `threads` each")
    ap.add_argument("--idle-runs", type=int, default=5)
    ap.add_argument("--core-policy", default=None, help="the profile's share_cores_policy (fair | prefill_first)")
    ap.add_argument("--profiles", default="single_node,single_node_direct",
                    help="servers to run, each a profile with optional overrides: single_node:key=value:...")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows: list[dict] = []
    overrides: dict = {"max_model_len": 1024} | ({"threads": a.threads} if a.threads else {})
    if a.share_cores is not None:
        overrides["share_cores"] = int(a.share_cores) if a.share_cores.isdigit() else a.share_cores
    if a.core_policy is not None:
        overrides["share_cores_policy"] = a.core_policy
    profiles = [p for p in a.profiles.split(",") if p]
    nodes: dict[str, Node] = {}
    try:
        for prof in profiles:
            name, own = server_spec(prof)
            nodes[prof] = Node(a.model, profile=name, overrides=overrides | own).start(quiet=True)
        torch.set_num_threads(2)
        engine = LLMEngine(EngineConfig(model=a.model, max_model_len=1024, enable_prefix_caching=False, threads=2))
        vocab, tok = engine.config.vocab_size, engine.tokenizer
        idle = {}
        clients = {prof: BatonClient(node.grpc_url) for prof, node in nodes.items()}
        paths = {prof: lambda p, t, n, c=c: run_server(c, tok, p, t, n) for prof, c in clients.items()}
        paths["engine"] = lambda p, t, n: run_engine(engine, p, t, n)
        for fn in paths.values():
            fn(workload(2, a.prompt_len, vocab, 1), [0, 0], 8)                       # warm-up
        # idle TTFT and batch-1 decode: one request at a time, the two paths alternating so that
        # drifts in the machine's speed hit both alike
        samples: dict[str, tuple[list, list]] = {name: ([], []) for name in paths}
        for k in range(a.idle_runs):
            for name, fn in paths.items():
                r, _ = fn(workload(1, a.prompt_len, vocab, 10 + k), [0.0], 128)
                samples[name][0].append(r[0]["ttft"])
                samples[name][1].append(tpot_s(r[0]))
        for name, (ttfts, tpots) in samples.items() if a.idle_runs else ():
            idle[name] = {"ttft_ms": 1000 * statistics.median(ttfts), "tpot_ms": 1000 * statistics.median(tpots),
                          "decode_tok_s": 1 / statistics.median(tpots),
                          "ttft_ms_runs": [round(1000 * x, 1) for x in ttfts],
                          "tpot_ms_runs": [round(1000 * x, 2) for x in tpots]}
            print(f"{name:18s} idle: TTFT {idle[name]['ttft_ms']:6.1f} ms  batch-1 TPOT {idle[name]['tpot_ms']:6.2f} ms "
                  f"({idle[name]['decode_tok_s']:.1f} tok/s)  TTFT runs {idle[name]['ttft_ms_runs']}", flush=True)
        mgr = RemoteBlockManager(nodes[profiles[0]].manager.address, 1, 16)
        before = mgr.stats()
        for rate, rnd in [(float(r), k) for r in a.rates.split(",") if r for k in range(a.rounds)]:
            prompts = workload(a.requests, a.prompt_len, vocab, int(rate * 100) + rnd)
            times = arrivals(a.requests, rate, int(rate * 1000) + rnd)
            for name, fn in paths.items():
                recs, wall = fn(prompts, times, a.new)
                row = summarize(name, rate, recs, wall) | {"round": rnd}
                rows.append(row)
                print(f"{name:18s} rate {rate:4.1f}/s: TTFT p50/p95/p99 {row['ttft_ms_p50']:6.1f}/{row['ttft_ms_p95']:6.1f}/"
                      f"{row['ttft_ms_p99']:6.1f} ms  TPOT p50 {row['tpot_ms_p50']:6.2f} ms  ITL p50/p99 "
                      f"{row['itl_ms_p50']:6.2f}/{row['itl_ms_p99']:6.2f} ms  {row['throughput_tok_s']:6.1f} tok/s",
                      flush=True)
        after = mgr.stats()
        t = time.perf_counter()
        for _ in range(200):
            mgr.stats()
        rtt_us = (time.perf_counter() - t) / 200 * 1e6
        gen_tokens = sum(r["tokens"] for r in rows if r["path"] == profiles[0])
        kv = {"calls_per_token": (after["calls"] - before["calls"]) / max(1, gen_tokens),
              "server_us_per_call": after["busy_us_per_call"], "rtt_us": rtt_us}
        # per pair of neighbouring runs, then the median: robust to the machine's drift
        overhead = {prof: statistics.median(t / e for t, e in zip(samples[prof][1], samples["engine"][1])) - 1
                    for prof in profiles if a.idle_runs}
        for prof, o in overhead.items():
            print(f"Triton overhead per token at batch 1, {prof}: {100 * o:+.1f}% of TPOT", flush=True)
        print(f"KV manager ({profiles[0]}): {kv['calls_per_token']:.3f} calls/token, "
              f"{kv['server_us_per_call']:.1f} us/call server, {rtt_us:.0f} us round trip", flush=True)
        engine.close()
    finally:
        for node in nodes.values():
            node.stop()
    if a.out:
        Path(a.out).write_text(json.dumps({"idle": idle, "rows": rows, "kv_manager": kv,
                                           "triton_overhead_batch1": overhead, "model": a.model,
                                           "overrides": overrides,
                                           "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


if __name__ == "__main__":
    main()
