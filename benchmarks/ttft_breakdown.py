"""Where idle TTFT goes through Triton (small, 128-token uncached prompts, max_tokens=1): a new gRPC
channel per request (a new BatonClient each time; one client keeps one channel), one persistent stream,
and the prefill model called alone. Every prompt is used once, so none hits the prefix cache.

    python benchmarks/ttft_breakdown.py [--model .cache/checkpoints/small]
"""

from __future__ import annotations

import argparse
import json
import queue
import time

from baton.backends.runtime import configure_process  # isort: skip

configure_process()  # before torch loads: OpenMP workers spin as in serving

import numpy as np
import torch
import tritonclient.grpc as grpc
from transformers import AutoTokenizer

from baton.backends.serving.launcher import Node
from baton_client import BatonClient


def ms(xs: list[float]) -> list[int]:
    return [round(1000 * x) for x in xs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/checkpoints/small")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    gen = torch.Generator().manual_seed(0)
    prompts = [tok.decode(torch.randint(3, tok.vocab_size, (128,), generator=gen).tolist()) for _ in range(17)]
    node = Node(a.model, overrides={"max_model_len": 1024}).start(quiet=True)
    try:
        with BatonClient(node.grpc_url) as client:
            for p in prompts[:2]:                               # warm-up
                list(client.stream(p, max_tokens=2))
        fresh = []
        for p in prompts[2:7]:
            with BatonClient(node.grpc_url) as client:          # a new client: a new connection
                t = time.perf_counter()
                it = client.stream(p, max_tokens=1)
                next(it)
                fresh.append(time.perf_counter() - t)
                list(it)
        print("new channel per request, TTFT ms:", ms(fresh))

        cl = grpc.InferenceServerClient(node.grpc_url)
        q: queue.Queue = queue.Queue()
        cl.start_stream(callback=lambda result, error: q.put((result, error)))
        persistent = []
        for k, p in enumerate(prompts[7:12]):
            text = grpc.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([p.encode()], dtype=object))
            mt = grpc.InferInput("max_tokens", [1], "INT32")
            mt.set_data_from_numpy(np.array([1], dtype=np.int32))
            t = time.perf_counter()
            cl.async_stream_infer("llm", [text, mt], request_id=str(k))
            result, _ = q.get()
            persistent.append(time.perf_counter() - t)
            while not result.as_numpy("finish_reason").reshape(-1)[0]:
                result, _ = q.get()
        cl.stop_stream()
        print("one persistent stream, TTFT ms:", ms(persistent))

        alone = []
        for p in prompts[12:17]:
            ids = grpc.InferInput("input_ids", [0], "INT64")
            arr = np.array(tok(p).input_ids, dtype=np.int64)
            ids.set_shape(list(arr.shape))
            ids.set_data_from_numpy(arr)
            sp = grpc.InferInput("sampling", [1], "BYTES")
            sp.set_data_from_numpy(np.array([json.dumps({"max_tokens": 1, "temperature": 0.0}).encode()], dtype=object))
            t = time.perf_counter()
            cl.infer("prefill", [ids, sp])
            alone.append(time.perf_counter() - t)
        print("prefill model alone, ms:", ms(alone))
        cl.close()
    finally:
        node.stop()


if __name__ == "__main__":
    main()
