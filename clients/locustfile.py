"""Load test for a Baton node with locust: users stream completions over Triton gRPC (`llm`) and
through the OpenAI gateway, and every request also reports its TTFT, TPOT and ITL as locust entries
(request types "TTFT", "TPOT", "ITL"; milliseconds), so locust's tables, CSV history and HTML report
carry them.

    locust -f clients/locustfile.py --headless -u 8 -r 2 -t 60s \\
        --triton 127.0.0.1:8001 --host http://127.0.0.1:9000 --model-name baton-tiny --max-tokens 64

`make loadtest` runs this and draws the plots (clients/loadtest_plots.py). TritonUser and OpenAIUser
run side by side; name one class after the options to run only it.
"""

from __future__ import annotations

import json
import random
import time

from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()        # locust runs users as gevent greenlets: grpc must cooperate with them

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from locust import HttpUser, User, between, events, task  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import serialize_byte_tensor  # noqa: E402

PROMPTS = ["def fibonacci(n):", "class LRUCache:", "import os\nimport sys\n", "async def main():\n    await",
           "def parse(path):\n    with open(path) as f:\n", "# Binary search over a sorted list\ndef search("]


@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # noqa: ANN001
    parser.add_argument("--triton", default="127.0.0.1:8001", help="the node's gRPC address")
    parser.add_argument("--model-name", default="baton-tiny", help="the gateway's model name")
    parser.add_argument("--max-tokens", type=int, default=64)


def _report(env, kind: str, name: str, ms: float, exc: Exception | None = None, length: int = 0) -> None:  # noqa: ANN001
    """One locust entry; `length` (locust's content size) is the request's tokens, so requests/s times
    the average size is tokens/s."""
    env.events.request.fire(request_type=kind, name=name, response_time=ms, response_length=length, exception=exc,
                            context={})


def _timings(env, name: str, t0: float, times: list[float], tokens: list[int]) -> None:  # noqa: ANN001
    """TTFT, then ITL for every later response, then the request's TPOT (a response may carry several tokens)."""
    if not times:
        return
    _report(env, "TTFT", name, (times[0] - t0) * 1000)
    for a, b in zip(times, times[1:]):
        _report(env, "ITL", name, (b - a) * 1000)
    later = sum(tokens) - tokens[0]
    if later > 0:
        _report(env, "TPOT", name, (times[-1] - times[0]) * 1000 / later)


class TritonUser(User):
    """Streams `llm` over Triton's gRPC ModelStreamInfer, as tritonclient does."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(opts.triton))
        self.max_tokens = opts.max_tokens

    def _request(self, prompt: str) -> service_pb2.ModelInferRequest:
        req = service_pb2.ModelInferRequest(model_name="llm")
        for name, dtype, raw in (("text_input", "BYTES", serialize_byte_tensor(np.array([prompt.encode()], dtype=object)).item()),
                                 ("max_tokens", "INT32", np.array([self.max_tokens], np.int32).tobytes()),
                                 ("ignore_eos", "BOOL", np.array([True]).tobytes())):
            req.inputs.add(name=name, datatype=dtype, shape=[1])
            req.raw_input_contents.append(raw)
        return req

    @task
    def stream(self) -> None:
        t0 = time.perf_counter()
        times, tokens, exc = [], [], None
        try:
            for r in self.stub.ModelStreamInfer(iter([self._request(random.choice(PROMPTS))]), timeout=300):
                if r.error_message:
                    raise RuntimeError(r.error_message)
                out = {o.name: raw for o, raw in zip(r.infer_response.outputs, r.infer_response.raw_output_contents)}
                times.append(time.perf_counter())
                tokens.append(len(out.get("token_ids", b"")) // 8)
        except Exception as e:          # grpc errors, server errors: a failed request in the report
            exc = e
        _report(self.environment, "gRPC stream", "llm", (time.perf_counter() - t0) * 1000, exc, sum(tokens))
        if exc is None:
            _timings(self.environment, "llm", t0, times, tokens)


class OpenAIUser(HttpUser):
    """Streams /v1/completions from the OpenAI gateway (--host), reading its SSE chunks."""

    wait_time = between(0.1, 0.5)

    @task
    def stream(self) -> None:
        opts = self.environment.parsed_options
        body = {"model": opts.model_name, "prompt": random.choice(PROMPTS), "max_tokens": opts.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        times, tokens = [], []
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="/v1/completions") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    resp.failure(chunk["error"]["message"])
                    return
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                    tokens.append(1)
                elif chunk.get("usage") and tokens:   # a chunk may carry several tokens: the last takes the rest
                    tokens[-1] += chunk["usage"]["completion_tokens"] - len(tokens)
            resp.request_meta["response_length"] = sum(tokens)
        _timings(self.environment, "/v1/completions", t0, times, tokens)
