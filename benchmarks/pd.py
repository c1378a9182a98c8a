"""PD across servers, measured (needs root: nodes on simulated hosts, network namespaces).

    python benchmarks/pd.py --model .cache/checkpoints/small --out benchmarks/results/pd-small-2cpu.json

1. Transfer: the GB/s of Baton's prefill -> decode block reads across the namespaces (the decode
   node's own counters: bytes over seconds, acks included) against the Mooncake transfer engine's
   own throughput for the same bytes between the same two namespaces, measured in the same run.
2. Interference, the reason for PD: steady decode streams plus a long prompt every few seconds.
   Single node (`baton serve`, both cores) versus 1P1D (prefill pinned to core 0, decode to core 1,
   the router and etcd unpinned), each also without the long prompts. Reports the steady streams'
   ITL p50/p99 and TPOT p50, and TTFT p50/p95 of the long prompts and the streams.
3. Idle TTFT: one request at a time on an idle server, single node versus 1P1D pinned as above,
   and versus 1P1D with neither node pinned (what routing and the transfer add).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from baton.backends.cluster.local import LocalCluster

HERE = Path(__file__).resolve().parent


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def prompt_of(tokenizer, n: int, rng: random.Random) -> str:  # noqa: ANN001
    """Text that tokenizes to about n tokens (random ids, so no two prompts share a cached prefix)."""
    ids = [rng.randrange(200, tokenizer.get_vocab_size()) for _ in range(n)]
    text = tokenizer.decode(ids)
    ids = tokenizer.encode(text).ids[:n]
    return tokenizer.decode(ids)


def workload(tokenizer, streams: int, stream_tokens: int, long_prompts: int, long_tokens: int, every_s: float,
             seed: int) -> list[dict]:  # noqa: ANN001
    rng = random.Random(seed)
    reqs = [{"prompt": prompt_of(tokenizer, 64, rng), "max_tokens": stream_tokens, "ignore_eos": True,
             "temperature": 0.0, "kind": "stream"} for _ in range(streams)]
    reqs += [{"prompt": prompt_of(tokenizer, long_tokens, rng), "max_tokens": 8, "ignore_eos": True,
              "temperature": 0.0, "delay": 2.0 + i * every_s, "kind": "long"} for i in range(long_prompts)]
    return reqs


def summarize(results: list[dict], kinds: list[str]) -> dict:
    out: dict = {}
    for kind in ("stream", "long"):
        rs = [r for r, k in zip(results, kinds) if k == kind]
        if not rs:
            continue
        errors = [r["error"] for r in rs if r["error"]]
        if errors:
            raise RuntimeError(f"{len(errors)} {kind} requests failed: {errors[0]}")
        ttft = [r["ttft"] for r in rs]
        out[f"{kind}_ttft_ms_p50"] = 1e3 * pct(ttft, 50)
        out[f"{kind}_ttft_ms_p95"] = 1e3 * pct(ttft, 95)
        if kind == "stream":
            itl = [x for r in rs for x in r["itl"]]
            out["stream_itl_ms_p50"] = 1e3 * pct(itl, 50)
            out["stream_itl_ms_p99"] = 1e3 * pct(itl, 99)
            out["stream_tpot_ms_p50"] = 1e3 * pct([r["tpot"] for r in rs if r["tpot"]], 50)
    all_ttft = [r["ttft"] for r in results]
    out["all_ttft_ms_p50"], out["all_ttft_ms_p95"] = 1e3 * pct(all_ttft, 50), 1e3 * pct(all_ttft, 95)
    return out


def run_job(prefix: list[str], url: str, requests: list[dict]) -> list[dict]:
    reqs = [{k: v for k, v in r.items() if k != "kind"} for r in requests]
    r = subprocess.run(prefix + [sys.executable, "-P", "-m", "baton.backends.cluster.probe", url],
                       input=json.dumps({"requests": reqs, "concurrency": len(reqs)}), capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)["results"]


def idle_ttft(prefix: list[str], url: str, prompts: dict[str, list[str]]) -> dict[str, float]:
    """Median TTFT (ms) of each group of prompts, one request at a time from one client (its
    connection made by a first request that is not counted)."""
    out = {}
    for name, group in prompts.items():
        reqs = [{"prompt": p, "max_tokens": 4, "ignore_eos": True} for p in [group[0], *group]]
        r = subprocess.run(prefix + [sys.executable, "-P", "-m", "baton.backends.cluster.probe", url],
                           input=json.dumps({"requests": reqs, "concurrency": 1}), capture_output=True, text=True,
                           timeout=900)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        out[name] = 1e3 * statistics.median([x["ttft"] for x in json.loads(r.stdout)["results"][1:]])
    return out


# ---- the transfer engine alone, between two namespaces ---------------------------------------------
def raw_serve(host: str, nbytes: int) -> None:
    import torch

    from baton.backends.kv.transfer import TransferAgent

    buf = torch.ones(nbytes, dtype=torch.uint8)
    agent = TransferAgent(host, "tcp", buf.data_ptr(), nbytes)
    print(json.dumps({"segment": agent.segment, "base": agent.base}), flush=True)
    sys.stdin.read()                     # until the reader is done


def raw_read(host: str, segment: str, base: int, nbytes: int, rounds: int) -> None:
    import torch

    from baton.backends.kv.transfer import BlockSource, TransferAgent

    buf = torch.zeros(nbytes, dtype=torch.uint8)
    agent = TransferAgent(host, "tcp", buf.data_ptr(), nbytes)
    src = BlockSource("raw", segment, base, nbytes, "")
    agent.read(src, [0], [0])            # connect once, as a running decode node already has
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        agent.read(src, [0], [0])
        times.append(time.perf_counter() - t)
    print(json.dumps({"gb_s": nbytes / statistics.median(times) / 1e9}), flush=True)


def raw_transfer(cluster: LocalCluster, nbytes: int, rounds: int = 10) -> float:
    hosts = cluster.hosts
    me = [sys.executable, "-P", str(Path(__file__).resolve())]
    # pinned as the nodes are: the source on prefill's core, the reader on decode's
    server = subprocess.Popen(hosts.run_in("prefill0") + ["taskset", "-c", "0"] + me +
                              ["--raw-serve", hosts.addr["prefill0"], str(nbytes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(server.stdout.readline())
        r = subprocess.run(hosts.run_in("decode0") + ["taskset", "-c", "1"] + me + ["--raw-read", hosts.addr["decode0"], info["segment"],
                                                           str(info["base"]), str(nbytes), str(rounds)],
                           capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])["gb_s"]
    finally:
        server.stdin.close()
        server.wait(10)


class _Skip(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/checkpoints/small")
    ap.add_argument("--out", default=None)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=400)
    ap.add_argument("--long-prompts", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=2000)
    ap.add_argument("--every", type=float, default=3.0, help="seconds between long prompts")
    ap.add_argument("--parts", default="single,pd", help="which deployments to run (ratios need both)")
    ap.add_argument("--raw-serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--raw-read", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_serve:
        return raw_serve(a.raw_serve[0], int(a.raw_serve[1]))
    if a.raw_read:
        return raw_read(a.raw_read[0], a.raw_read[1], int(a.raw_read[2]), int(a.raw_read[3]), int(a.raw_read[4]))
    from tokenizers import Tokenizer

    from baton.backends.serving.launcher import free_port

    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    busy = workload(tok, a.streams, a.stream_tokens, a.long_prompts, a.long_tokens, a.every, seed=1)
    quiet = [r for r in busy if r["kind"] == "stream"]
    rng = random.Random(7)
    idle_prompts = {"128": [prompt_of(tok, 128, rng) for _ in range(11)],
                    str(a.long_tokens): [prompt_of(tok, a.long_tokens, rng) for _ in range(5)]}
    transfer_prompts = [prompt_of(tok, a.long_tokens, rng) for _ in range(4)]
    report: dict = {"model": a.model, "cpus": len(os.sched_getaffinity(0)), "workload": {
        "streams": a.streams, "stream_tokens": a.stream_tokens, "long_prompts": a.long_prompts,
        "long_tokens": a.long_tokens, "every_s": a.every}, "date": time.strftime("%Y-%m-%d %H:%M")}

    # single node, both cores
    run_root = Path(os.environ.get("TMPDIR", "/tmp")) / f"baton-{os.getpid()}-pdbench"
    run_root.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(3)]
    log = open(run_root / "single.log", "wb")  # noqa: SIM115
    parts = a.parts.split(",")
    single = None if "single" not in parts else subprocess.Popen(["taskset", "-c", "0-1", sys.executable, "-P", "-m", "baton.backends.cli", "serve",
                               "--model", a.model, "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                               "--metrics-port", str(ports[2]), "--gateway-port", "-1"],
                              stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"BATON_RUN_DIR": str(run_root)})
    try:
        if single is None:
            raise _Skip
        deadline = time.monotonic() + 300
        while "[baton] serving" not in (run_root / "single.log").read_text(errors="replace"):
            if single.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((run_root / "single.log").read_text()[-2000:])
            time.sleep(0.2)
        url = f"127.0.0.1:{ports[1]}"
        run_job([], url, quiet[:1])                                       # warm up
        report["single_idle_ttft_ms"] = idle_ttft([], url, idle_prompts)
        report["single_quiet"] = summarize(run_job([], url, quiet), ["stream"] * len(quiet))
        report["single_busy"] = summarize(run_job([], url, busy), [r["kind"] for r in busy])
        print(json.dumps({k: report[k] for k in ("single_idle_ttft_ms", "single_quiet", "single_busy")}, indent=1),
              flush=True)
    except _Skip:
        pass
    finally:
        if single is not None:
            single.terminate()
            single.wait(60)
    if "pd" not in parts:
        print(json.dumps(report, indent=1))
        return

    # 1P1D on simulated hosts, each server on its own core
    cluster = LocalCluster(a.model, 1, 1, hosts=True, taskset={"prefill0": "0", "decode0": "1"}).start()
    try:
        hub = cluster.hosts.run_in("hub")
        url = cluster.router.grpc
        run_job(hub, url, quiet[:1])
        report["pd_idle_ttft_ms"] = idle_ttft(hub, url, idle_prompts)
        report["pd_quiet"] = summarize(run_job(hub, url, quiet), ["stream"] * len(quiet))
        report["pd_busy"] = summarize(run_job(hub, url, busy), [r["kind"] for r in busy])
        # the transfer of long prompts on the otherwise idle cluster, from decode's own counters
        def counters() -> dict[str, float]:
            time.sleep(1.5)                          # decode's counters reach its metrics about once a second
            return {k: cluster.metric(f"baton:kv_transfer_{k}_total", ["decode0"])["decode0"]
                    for k in ("bytes", "seconds", "blocks_read", "failures")}
        before = counters()
        for p in transfer_prompts:
            run_job(hub, url, [{"prompt": p, "max_tokens": 2}])          # 1 would end at prefill
        m = {k: v - before[k] for k, v in counters().items()}
        baton_gb_s = m["bytes"] / m["seconds"] / 1e9
        per_prompt = int(m["bytes"] / len(transfer_prompts))
        raw = raw_transfer(cluster, per_prompt)
        report["transfer"] = {"baton_gb_s": baton_gb_s, "engine_gb_s_same_bytes": raw, "ratio": baton_gb_s / raw,
                              "bytes_per_prompt": per_prompt, "blocks_read": m["blocks_read"],
                              "failures": m["failures"], "prompts": len(transfer_prompts)}
    finally:
        cluster.stop()
    # idle TTFT with neither node pinned: what routing and the transfer add (compute is the same)
    cluster = LocalCluster(a.model, 1, 1, hosts=True).start()
    try:
        hub = cluster.hosts.run_in("hub")
        run_job(hub, cluster.router.grpc, quiet[:1])
        report["pd_unpinned_idle_ttft_ms"] = idle_ttft(hub, cluster.router.grpc, idle_prompts)
    finally:
        cluster.stop()
    if "single" not in parts:
        print(json.dumps(report, indent=1))
        return
    s, p = report["single_busy"], report["pd_busy"]
    report["ratios"] = {
        "pd_busy_itl_p99_over_pd_quiet_itl_p99": p["stream_itl_ms_p99"] / report["pd_quiet"]["stream_itl_ms_p99"],
        "pd_busy_itl_p99_over_single_busy": p["stream_itl_ms_p99"] / s["stream_itl_ms_p99"],
        "single_busy_itl_p99_over_single_quiet": s["stream_itl_ms_p99"] / report["single_quiet"]["stream_itl_ms_p99"],
        **{f"pd_idle_ttft_over_single_{k}": report["pd_idle_ttft_ms"][k] / report["single_idle_ttft_ms"][k]
           for k in idle_prompts},
        **{f"pd_unpinned_idle_ttft_over_single_{k}": report["pd_unpinned_idle_ttft_ms"][k] / report["single_idle_ttft_ms"][k]
           for k in idle_prompts},
        "transfer_ratio": report["transfer"]["ratio"],
    }
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
