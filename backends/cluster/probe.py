"""Requests to a cluster from inside a simulated host (`ip netns exec NS python -m
baton.backends.cluster.probe URL`), for tests and benchmarks whose client must sit on the cluster's
network: reads a JSON job from stdin, prints a JSON result.

  {"requests": [{"prompt": "...", "cancel_after": 3, "delay": 0.5, ...sampling...}], "concurrency": 4}
      -> {"results": [{"token_ids", "finish_reason", "error", "cached_tokens", "ttft", "itl", "tpot", "e2e"}]}
  (ttft, tpot, e2e in seconds; itl: every gap between responses after the first)
  {"metrics": ["http://host:port/metrics", ...]} -> {"metrics": ["<text>", ...]}"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def run_request(client, req: dict) -> dict:  # noqa: ANN001
    from baton_client import BatonError

    req = dict(req)
    prompt, cancel_after = req.pop("prompt"), req.pop("cancel_after", None)
    time.sleep(req.pop("delay", 0.0))        # a schedule: each request starts this long after the job
    ids: list[int] = []
    out = {"token_ids": ids, "finish_reason": "", "error": "", "cached_tokens": 0, "ttft": None, "itl": [],
           "tpot": None, "e2e": None}
    t0 = last = time.perf_counter()
    first_tokens = 0
    try:
        for chunk in client.stream(prompt, **req):
            now = time.perf_counter()
            if out["ttft"] is None:
                out["ttft"], first_tokens = now - t0, len(chunk.token_ids)
            elif chunk.token_ids:
                out["itl"].append(now - last)     # a gap between responses (one may carry several tokens)
                out["tpot"] = (now - t0 - out["ttft"]) / (len(ids) + len(chunk.token_ids) - first_tokens)
            last = now
            ids += chunk.token_ids
            out["cached_tokens"] = chunk.cached_tokens
            out["cached_tokens_by_tier"] = chunk.cached_tokens_by_tier
            if chunk.finish_reason:
                out["finish_reason"] = chunk.finish_reason
            if cancel_after is not None and len(ids) >= cancel_after:
                out["finish_reason"] = "cancelled"
                break                              # closing the stream cancels the request
    except BatonError as e:
        out["error"] = str(e)
    out["e2e"] = time.perf_counter() - t0
    out["t_end"] = time.time()           # wall clock: comparable with the caller's (same machine)
    return out


def main() -> None:
    job = json.load(sys.stdin)
    if "metrics" in job:
        texts = [urllib.request.urlopen(u, timeout=5).read().decode() for u in job["metrics"]]
        json.dump({"metrics": texts}, sys.stdout)
        return
    from baton_client import BatonClient

    client = BatonClient(sys.argv[1])
    with ThreadPoolExecutor(max(1, int(job.get("concurrency", 1)))) as pool:
        results = list(pool.map(lambda r: run_request(client, r), job["requests"]))
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    main()
