"""EPD measured: a vision-language model served monolithic (the vision tower inside prefill, profile
single_node_vl_mono, both cores shared by every stage) against EPD arms on the same box (profile
single_node_vl, the `encode` stage pinned to core 1; ARMS below says where the other stages run).

    python benchmarks/epd.py --model .cache/checkpoints/small-qwen2.5-vl --arms mono,epd,epd_prio \
        --out benchmarks/results/epd-small-vl-2cpu.json

Both servers run at once and the arms alternate (same minutes). Per offered rate, a mixed workload:
Poisson arrivals, half text-only chat turns, half one new image (448x448: 256 visual tokens) plus a
question; each asks for `--max-tokens` tokens. Reported per arm and rate: completed requests/s and
output tok/s, TTFT p50/p95 (text and image requests apart), ITL p99 of the text streams; and the
text streams' ITL p99 with the image half left out (the image-free value), and with each image
request replaced by a text request of as many prompt tokens (same arrivals, same decode load: what
is left of the excess is the images' own doing). Then a repeated image's TTFT against a new image's,
on an idle server.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from baton.backends.cluster.probe import run_request
from baton.backends.serving.launcher import free_port

PROFILE = """extends = "{base}"
[engine]
dtype = "{dtype}"
max_model_len = 2048
kv_cache_memory_mb = 256
{engine}
[serving]
max_tokens_limit = 512
prefill_chunk_tokens = {chunk}
decode_wait_ms = {decode_wait_ms}
stream_responses_per_step = {responses_per_step}
{serving}
{extra}
"""
ARMS = {
    # everything on both cores, the tower inside prefill
    "mono": dict(base="single_node_vl_mono", engine="", serving="", taskset=""),
    # the node on core 0, its encode stage, front and preprocess moved to core 1 (encode_cpus, front_cpus)
    "epd": dict(base="single_node_vl", engine="threads = 1",
                serving='share_cores = 1\nencode_cpus = "1"\nfront_cpus = "1"', taskset="0"),
    # prefill moved beside the encoder (prefill_cpus, share_cores = 0): decode never waits for a
    # prompt on core 0 (it shares it with tritonserver and the KV manager only)
    "epd_pd": dict(base="single_node_vl", engine="threads = 1",
                   serving='share_cores = 0\nencode_cpus = "1"\nfront_cpus = "1"\nprefill_cpus = "1"', taskset="0"),
    # the encoder on core 1 and decode on core 0 as before; prefill on no core of its own but below
    # them in priority (prefill_nice): it takes what decode and the request path leave idle, on either
    # core, and the kernel preempts it when they wake
    "epd_prio": dict(base="single_node_vl", engine="threads = 1",
                     serving='share_cores = 0\nencode_cpus = "1"\ndecode_cpus = "0"\nprefill_nice = 10', taskset=""),
    # as epd_prio, with the front and preprocess beside the encoder (images decoded off decode's core)
    "epd_prio_front": dict(base="single_node_vl", engine="threads = 1",
                           serving='share_cores = 0\nencode_cpus = "1"\nfront_cpus = "1"\ndecode_cpus = "0"\n'
                                   'prefill_nice = 10', taskset=""),
    # as epd_prio, with two encode instances of one thread each on no core of their own (nice 19, as
    # every encoder): the tower takes whatever either core leaves idle, one image per instance
    "epd_prio_enc2": dict(base="single_node_vl", engine="threads = 1",
                          serving='share_cores = 0\ndecode_cpus = "0"\nprefill_nice = 10', taskset="",
                          extra="[instances]\nencode = 2"),
    # decode alone on core 0; everything else (tritonserver, the KV manager, the front, preprocess, the
    # encoder, prefill) on core 1: the text streams' steps wait for nothing but other decode rows
    "epd_iso": dict(base="single_node_vl", engine="threads = 1",
                    serving='share_cores = 0\nencode_cpus = "1"\nfront_cpus = "1"\nprefill_cpus = "1"\n'
                            'decode_cpus = "0"\nprefill_nice = 10', taskset="1"),
    # as epd_prio, decode on both cores (two threads): its steps take the core the encoder holds, at once
    # (the encoder runs at nice 19)
    "epd_prio_d2": dict(base="single_node_vl", engine="threads = 1",
                        serving='share_cores = 0\nencode_cpus = "1"\ndecode_cpus = "0,1"\nprefill_nice = 10', taskset=""),
    # as epd_prio, prefill at the lowest priority (the encoder's)
    "epd_prio19": dict(base="single_node_vl", engine="threads = 1",
                       serving='share_cores = 0\nencode_cpus = "1"\ndecode_cpus = "0"\nprefill_nice = 19', taskset=""),
}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def png_url(h: int, w: int, seed: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def question(rng: random.Random) -> str:
    words = "what where which show list explain compare describe count colour shape left right top bottom".split()
    return " ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) + "?"


class Server:
    def __init__(self, arm: str, model: str, root: Path, chunk: int, decode_wait_ms: float,
                 responses_per_step: int, dtype: str) -> None:
        a = ARMS[arm]
        prof = root / f"{arm}.toml"
        prof.write_text(PROFILE.format(**{"extra": ""} | a, chunk=chunk, decode_wait_ms=decode_wait_ms,
                                       responses_per_step=responses_per_step, dtype=dtype))
        self.grpc = free_port()
        run = root / arm
        run.mkdir()
        cmd = [sys.executable, "-P", "-m", "baton.backends.cli", "serve", str(prof), "--model", model,
               "--http-port", str(free_port()), "--grpc-port", str(self.grpc), "--metrics-port", str(free_port()),
               "--gateway-port", "-1"]
        if a["taskset"]:
            cmd = ["taskset", "-c", a["taskset"], *cmd]
        self.log = run / "serve.log"
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     env=os.environ | {"BATON_RUN_DIR": str(run)}, start_new_session=True)
        deadline = time.monotonic() + 300
        while "[baton] serving" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{arm} did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def run(self, requests: list[dict]) -> tuple[list[dict], float]:
        from baton_client import BatonClient

        client = BatonClient(f"127.0.0.1:{self.grpc}")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            out = list(pool.map(lambda r: run_request(client, r), requests))
        wall = time.perf_counter() - t0
        client.close()
        return out, wall

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def filler(model: str, tokens: int) -> str:
    """Words that make `tokens` prompt tokens under the model's tokenizer (what a 448x448 image takes)."""
    from transformers import AutoTokenizer

    tok, rng, words = AutoTokenizer.from_pretrained(model), random.Random(3), []
    colours = "red green blue cat dog tree house sky road hill lake river cloud".split()
    while len(tok(" ".join(words))["input_ids"]) < tokens:
        words.append(rng.choice(colours))
    return " ".join(words)


IMAGE_TOKENS = (448 // 28) ** 2 + 2          # its <|image_pad|> tokens and the vision start and end


def workload(rate: float, duration: float, max_tokens: int, seed: int, images: bool = True,
             one_image: bool = False, instead: str = "") -> list[dict]:
    """Poisson arrivals at `rate`/s for `duration` s; every other request has a new image (one_image:
    the same image each time, so its embeddings and KV are cached and only its decode rows remain;
    `instead`: text put in the image's place, the request then has no image)."""
    rng = random.Random(seed)
    reqs, t, i = [], 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return reqs
        with_image = i % 2 == 1
        i += 1
        if with_image and not images:
            continue
        content: list[dict] = [{"type": "text", "text": question(rng)}]
        if with_image and instead:
            content = [{"type": "text", "text": instead + " " + content[0]["text"]}]
        elif with_image:
            url = png_url(448, 448, seed * 100_000 + (1 if one_image else i))
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        reqs.append({"prompt": None, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "ignore_eos": True, "temperature": 0.0, "delay": t, "kind": "image" if with_image else "text"})


def summarize(results: list[dict], kinds: list[str], wall: float) -> dict:
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    start = min(r["t_end"] - r["e2e"] for r in results)
    span = max(r["t_end"] for r in results) - start
    out = {"requests": len(results), "req_per_s": len(results) / span,
           "output_tok_per_s": sum(len(r["token_ids"]) for r in results) / span, "span_s": span}
    for kind in ("text", "image"):
        rs = [r for r, k in zip(results, kinds) if k == kind]
        if rs:
            out[f"{kind}_ttft_ms_p50"] = 1e3 * pct([r["ttft"] for r in rs], 50)
            out[f"{kind}_ttft_ms_p95"] = 1e3 * pct([r["ttft"] for r in rs], 95)
    out["text_itl_ms_p99"] = 1e3 * pct([x for r, k in zip(results, kinds) if k == "text" for x in r["itl"]], 99)
    out["text_itl_ms_p50"] = 1e3 * pct([x for r, k in zip(results, kinds) if k == "text" for x in r["itl"]], 50)
    return out


def measure(server: Server, reqs: list[dict]) -> dict:
    kinds = [r.pop("kind") for r in reqs]
    results, wall = server.run(reqs)
    return summarize(results, kinds, wall)


def repeated_image(server: Server, trials: int, seed: int) -> dict:
    """TTFT of a new image, then of the same image again (its embeddings and prefix cached)."""
    new, again = [], []
    for i in range(trials):
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(448, 448, seed + i)}},
                                            {"type": "text", "text": "What is in this picture?"}]}]
        for bucket in (new, again):
            (r,), _ = server.run([{"prompt": None, "messages": msg, "max_tokens": 4, "ignore_eos": True,
                                   "temperature": 0.0}])
            if r["error"]:
                raise RuntimeError(r["error"])
            bucket.append(r["ttft"])
    return {"new_image_ttft_ms": 1e3 * statistics.median(new), "repeated_image_ttft_ms": 1e3 * statistics.median(again),
            "ratio": statistics.median(again) / statistics.median(new)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=".cache/checkpoints/small-qwen2.5-vl")
    ap.add_argument("--rates", default="2,4,6,8")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=64, help="prefill_chunk_tokens of both arms (a decode step "
                    "waits for at most one chunk)")
    ap.add_argument("--decode-wait-ms", type=float, default=3.0, help="decode_wait_ms of both arms (a decode "
                    "step gets in between two layers of a prefill that has run this long; 0: only between chunks)")
    ap.add_argument("--responses-per-step", type=int, default=0, help="stream_responses_per_step of both arms; "
                    "0 (every token its own response) so that a gap between responses is a decode step's cadence, "
                    "not the coalescing, which spaces responses by the number of live streams")
    ap.add_argument("--dtype", default="auto", help="the model's dtype in every arm (float32 where the CPU has no "
                    "native bf16 GEMMs: torch's bf16 prefill ran 13x slower than fp32 on an AVX2 host)")
    ap.add_argument("--one-image", action="store_true", help="the image half repeats one image (cached "
                    "after its first use): what the image requests' decode rows alone do to the text streams")
    ap.add_argument("--client-cpus", default="", help="CPUs this client runs on once the servers are up, e.g. "
                    "\"1\" (the servers keep theirs); \"\": any")
    ap.add_argument("--arms", default=",".join(ARMS), help="the arms to run, mono first (the ratios' baseline)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix=f"baton-{os.getpid()}-epd-bench-"))
    arms = a.arms.split(",")
    if arms[0] != "mono" or not set(arms) <= set(ARMS):
        raise SystemExit(f"--arms: mono first, then some of {list(ARMS)[1:]}")
    servers = {arm: Server(arm, a.model, root, a.chunk, a.decode_wait_ms, a.responses_per_step, a.dtype)
               for arm in arms}
    if a.client_cpus:
        from baton.backends.serving.config import pin_to

        pin_to(a.client_cpus)
    report: dict = {"model": a.model, "cpus": os.cpu_count(), "client_cpus": a.client_cpus, "dtype": a.dtype,
                    "max_tokens": a.max_tokens, "duration_s": a.duration, "one_image": a.one_image,
                    "prefill_chunk_tokens": a.chunk, "decode_wait_ms": a.decode_wait_ms,
                    "stream_responses_per_step": a.responses_per_step,
                    "arms": {k: dict(ARMS[k]) for k in arms}, "rates": {}}
    try:
        for s in servers.values():              # warm up: a few of each kind
            measure(s, workload(2.0, 2.0, 8, seed=999))
        instead = filler(a.model, IMAGE_TOKENS)
        for rate in [float(x) for x in a.rates.split(",")]:
            row: dict = {}
            for arm, s in servers.items():
                row[arm] = measure(s, workload(rate, a.duration, a.max_tokens, seed=int(rate * 10),
                                               one_image=a.one_image))
                row[arm]["image_free"] = measure(s, workload(rate, a.duration, a.max_tokens, seed=int(rate * 10),
                                                             images=False))
                row[arm]["text_for_image"] = measure(s, workload(rate, a.duration, a.max_tokens,
                                                                 seed=int(rate * 10), instead=instead))
                print(f"rate {rate}/s {arm}: {json.dumps({k: round(v, 2) for k, v in row[arm].items() if not isinstance(v, dict)})}"
                      f" image-free ITL p99 {row[arm]['image_free']['text_itl_ms_p99']:.1f} ms, text for image "
                      f"{row[arm]['text_for_image']['text_itl_ms_p99']:.1f} ms", flush=True)
            for arm in arms:
                if arm != "mono":
                    row[f"{arm}_over_mono_req_per_s"] = row[arm]["req_per_s"] / row["mono"]["req_per_s"]
            for arm in arms:
                row[f"{arm}_text_itl_p99_over_image_free"] = (row[arm]["text_itl_ms_p99"]
                                                              / row[arm]["image_free"]["text_itl_ms_p99"])
                row[f"{arm}_text_itl_p99_over_text_for_image"] = (row[arm]["text_itl_ms_p99"]
                                                                  / row[arm]["text_for_image"]["text_itl_ms_p99"])
            report["rates"][str(rate)] = row
            print(f"rate {rate}/s: " + ", ".join(f"{arm}/mono throughput {row[f'{arm}_over_mono_req_per_s']:.2f}x, text "
                                                 f"ITL p99 / image-free {row[f'{arm}_text_itl_p99_over_image_free']:.2f}x, "
                                                 f"/ text for image {row[f'{arm}_text_itl_p99_over_text_for_image']:.2f}x"
                                                 for arm in arms if arm != "mono"), flush=True)
        report["repeated_image"] = {arm: repeated_image(s, a.trials, seed=7_000_000) for arm, s in servers.items()}
        print(json.dumps(report["repeated_image"], indent=1), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
