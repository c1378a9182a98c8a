"""The KV tiers, measured on a multi-turn chat trace through a real node (`baton serve`'s Node).

    python benchmarks/kv_tiers.py --model .cache/checkpoints/small --out benchmarks/results/kv-tiers-small-2cpu.json

The trace is deterministic (seeded): C conversations x T turns; every prompt starts with one shared
system prompt (1,000 tokens) and holds the conversation so far (user turns and scripted assistant
answers, so every mode sends the same prompts); conversations start at Poisson times and a turn
follows the previous answer after an exponential think time. The pool (L1) is sized to 1/8 of the
trace's distinct prompt blocks (the working set is ~8x L1). Modes, one node each, in one run:

  off    no prefix caching: every prompt token is computed
  l1     the pool's prefix cache only
  l1+l2  + host memory (L2, 2x L1, written back on eviction)
  l1+l3+l4  + Mooncake Store (L3, started by the node, 2x L1, written through) + local files (L4,
         a fresh directory, written through), no host memory
  all    L1 + L2 + L3 + L4

Reported per mode: TTFT p50/p95, prompt tokens computed, cached tokens per tier (their share of all
prompt tokens), requests/s and generated tokens/s over the trace's wall time."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIERS = ("device", "host", "store", "disk")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def text_of(tok, n: int, rng: random.Random) -> str:  # noqa: ANN001
    """About n tokens of text on one line, ending in a newline (so a following piece starts a new
    pre-token and the earlier tokens stay as they were)."""
    ids = [rng.randrange(200, tok.get_vocab_size()) for _ in range(n)]
    text = " ".join(tok.decode(ids).split())
    return tok.decode(tok.encode(text).ids[:n]).replace("\n", " ").strip() + "\n"


def trace(tok, conversations: int, turns: int, system_tokens: int, user_tokens: int, answer_tokens: int,  # noqa: ANN001
          rate: float, think_s: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    system = "System: " + text_of(tok, system_tokens, rng)
    convs, t = [], 0.0
    for c in range(conversations):
        t += rng.expovariate(rate)
        history, reqs = system, []
        for k in range(turns):
            history += "User: " + text_of(tok, user_tokens, rng)
            reqs.append({"prompt": history + "Assistant:", "think": rng.expovariate(1 / think_s) if k else 0.0})
            history += "Assistant: " + text_of(tok, answer_tokens, rng)
        convs.append({"start": t, "turns": reqs, "id": c})
    return convs


def distinct_blocks(tok, convs: list[dict], block: int) -> int:  # noqa: ANN001
    from baton.backends.kv.hashing import hash_blocks

    seen: set[int] = set()
    for c in convs:
        for r in c["turns"]:
            seen.update(hash_blocks(tok.encode(r["prompt"]).ids, block))
    return len(seen)


def run_trace(url: str, convs: list[dict], max_tokens: int, timeout: float) -> tuple[list[dict], list[str], float]:
    from baton_client import BatonClient, BatonError

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def conversation(c: dict) -> None:
        client = BatonClient(url, "grpc")
        time.sleep(max(0.0, t0 + c["start"] - time.monotonic()))
        for r in c["turns"]:
            time.sleep(r["think"])
            start = time.monotonic()
            ttft, last = None, None
            try:
                for chunk in client.stream(r["prompt"], max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                           timeout=timeout):
                    if ttft is None:
                        ttft = time.monotonic() - start
                    last = chunk
            except BatonError as e:          # counted, not fatal: the other conversations go on
                with lock:
                    errors.append(str(e)[:200])
                break
            with lock:
                results.append({"conv": c["id"], "ttft": ttft, "prompt_tokens": last.prompt_tokens,
                                "cached": last.cached_tokens, "by_tier": last.cached_tokens_by_tier,
                                "tokens": last.completion_tokens})
        client.close()

    threads = [threading.Thread(target=conversation, args=(c,)) for c in convs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, errors, time.monotonic() - t0


def summarize(results: list[dict], errors: list[str], wall: float) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    cached = [sum(r["by_tier"][i] for r in results) for i in range(len(TIERS))]
    ttft = [r["ttft"] for r in results]
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else "",
            "wall_s": round(wall, 1),
            "ttft_p50_s": round(pct(ttft, 50), 4), "ttft_p95_s": round(pct(ttft, 95), 4),
            "ttft_mean_s": round(statistics.mean(ttft), 4),
            "prompt_tokens": prompt, "prompt_tokens_computed": prompt - sum(r["cached"] for r in results),
            "cached_tokens_by_tier": dict(zip(TIERS, cached)),
            "hit_ratio_by_tier": {t: round(c / prompt, 4) for t, c in zip(TIERS, cached)},
            "requests_per_s": round(len(results) / wall, 3),
            "generated_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/checkpoints/small")
    ap.add_argument("--out", default=None)
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--user-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--rate", type=float, default=1.0, help="conversations started per second (Poisson)")
    ap.add_argument("--think", type=float, default=2.0, help="mean seconds between an answer and the next turn")
    ap.add_argument("--modes", default="off,l1,l1+l2,l1+l3+l4,all")
    ap.add_argument("--request-timeout", type=float, default=300, help="a request not done by then counts as an error")
    ap.add_argument("--host-factor", type=float, default=2, help="L2's size over L1's")
    ap.add_argument("--store-factor", type=float, default=2, help="L3's size (this node's share) over L1's")
    ap.add_argument("--l1-fraction", type=float, default=1 / 8, help="the pool's blocks over the trace's distinct blocks")
    a = ap.parse_args()
    from tokenizers import Tokenizer

    from baton.backends.serving.launcher import Node

    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    convs = trace(tok, a.conversations, a.turns, a.system_tokens, a.user_tokens, a.answer_tokens, a.rate, a.think,
                  seed=1)
    longest = max(len(tok.encode(r["prompt"]).ids) for c in convs for r in c["turns"])
    distinct = distinct_blocks(tok, convs, 16)
    l1 = max(int(distinct * a.l1_fraction), -(-(longest + a.answer_tokens) // 16) * 2 + 8)   # two prompts fit
    from baton.backends.engine.llm_engine import pool_spec, resolve_dtype
    from baton.backends.models.config import ModelConfig

    cfg = ModelConfig.from_dir(a.model)
    max_len = min(cfg.max_position_embeddings, 4096)
    if longest + a.answer_tokens > max_len:
        raise SystemExit(f"the trace's longest prompt ({longest} tokens) + answer exceeds the model's {max_len}")
    block_mb = pool_spec(cfg, resolve_dtype("auto", cfg.torch_dtype), 16, l1, 0).block_bytes / 2**20
    report: dict = {"model": a.model, "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "trace": {"conversations": a.conversations, "turns": a.turns, "system_tokens": a.system_tokens,
                              "user_tokens": a.user_tokens, "answer_tokens": a.answer_tokens, "rate": a.rate,
                              "think_s": a.think, "longest_prompt": longest, "distinct_blocks": distinct},
                    "l1_blocks": l1, "l1_mb": round(l1 * block_mb, 1), "host_factor": a.host_factor,
                    "store_factor": a.store_factor, "modes": {}}
    for mode in a.modes.split(","):
        disk = tempfile.mkdtemp(prefix="baton-bench-kv-")
        over: dict = {"num_blocks": l1, "max_model_len": max_len, "max_tokens_limit": max_len}
        host_mb = max(1, int(a.host_factor * l1 * block_mb))
        if mode == "off":
            over["enable_prefix_caching"] = False
        elif mode == "l1+l2":
            over["kv_tiers"] = {"host_mb": host_mb}
        elif mode == "l1+l3+l4":        # no host tier: what L2 caught comes from the store and the files
            over["kv_tiers"] = {"store": "auto", "disk_dir": disk,
                                "store_mb": max(1, int(a.store_factor * l1 * block_mb))}
        elif mode == "all":
            over["kv_tiers"] = {"host_mb": host_mb, "store": "auto", "disk_dir": disk,
                                "store_mb": max(1, int(a.store_factor * l1 * block_mb))}
        node = Node(a.model, "single_node", overrides=over, gateway_port=None)
        node.start(timeout=300, quiet=True)
        try:
            results, errors, wall = run_trace(node.grpc_url, convs, a.answer_tokens, a.request_timeout)
        finally:
            node.stop()
        report["modes"][mode] = summarize(results, errors, wall)
        print(mode, json.dumps(report["modes"][mode]), flush=True)
    base = report["modes"].get("l1")
    if base:
        report["vs_l1"] = {m: {"ttft_p50": round(r["ttft_p50_s"] / base["ttft_p50_s"], 3),
                               "ttft_p95": round(r["ttft_p95_s"] / base["ttft_p95_s"], 3),
                               "computed": round(r["prompt_tokens_computed"] / max(1, base["prompt_tokens_computed"]), 3),
                               "throughput": round(r["generated_tokens_per_s"] / base["generated_tokens_per_s"], 3)}
                           for m, r in report["modes"].items()}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
