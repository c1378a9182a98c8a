"""The `llm` front's calls to its node's stages (preprocess, prefill, decode), made over the node's
own gRPC port on loopback instead of through BLS.

Why not BLS: Triton 2.51's Python stub builds a BLS response's tensors, numpy arrays included, with
the GIL released (InferRequest::Exec releases it for the whole call; a decoupled call's later
responses are loaded on the stub's queue-monitor thread, which never holds it). The front serves each
request on its own Python thread, so those arrays were made while other threads ran Python: measured,
the front's stub died (SIGSEGV, "free(): invalid pointer") within 5 to 15 cancelled streams beside a
second one. gRPC makes its Python objects with the GIL held. The stages stay separate Triton models,
and the KV still travels only as a handle."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from ..serving.config import STAGE_KEY_PARAM
from .front import FrontError

Arrays = dict[str, np.ndarray]

# A stage's gRPC status as the front's error codes (FrontError.code; model.py maps them to Triton's).
_CODES = {grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.UNAVAILABLE: "unavailable",
          grpc.StatusCode.DEADLINE_EXCEEDED: "unavailable"}
# A stream's deadline past the request's own limit: the relay cuts a request at request_timeout_s
# when its responses flow; this ends one whose stage went silent.
STREAM_GRACE_S = 30.0

ALIVE_CHECK_S = 0.5                  # how often a call with `alive` asks it (a cached membership read)

MAX_MESSAGE_BYTES = 64 << 20         # prompts are bounded long before this (max_model_len tokens)


def encode(model: str, arrays: Arrays, outputs: list[str], stage_key: str = "") -> service_pb2.ModelInferRequest:
    """stage_key: the node's key for calls to its internal stages (serving.config.NodeConfig.stage_key)."""
    req = service_pb2.ModelInferRequest(model_name=model)
    if stage_key:
        req.parameters[STAGE_KEY_PARAM].string_param = stage_key
    for name, a in arrays.items():
        req.inputs.add(name=name, datatype=np_to_triton_dtype(a.dtype), shape=a.shape)   # data: raw, in order
        if a.dtype == np.object_ or a.dtype.type == np.bytes_:
            raw = serialize_byte_tensor(a)
            req.raw_input_contents.append(raw.item() if raw.size else b"")
        else:
            req.raw_input_contents.append(np.ascontiguousarray(a).tobytes())
    for name in outputs:
        req.outputs.add(name=name)
    return req


def decode(resp: service_pb2.ModelInferResponse) -> Arrays:
    out = {}
    for t, raw in zip(resp.outputs, resp.raw_output_contents):
        shape = tuple(t.shape)
        if t.datatype == "BYTES":
            out[t.name] = deserialize_bytes_tensor(raw).reshape(shape)
        else:
            out[t.name] = np.frombuffer(raw, dtype=triton_to_np_dtype(t.datatype)).reshape(shape)
    return out


GIVEN_UP = "the server stopped answering (it left the name service)"


@dataclass(eq=False)
class _Watched:
    call: Any                     # a gRPC future or stream (both have cancel())
    alive: Callable[[], bool]
    gave_up: bool = False         # cancelled by the watch


class _Watch:
    """Calls in flight on servers that may go silent: every ALIVE_CHECK_S each call's `alive` is
    asked, and a call it says False to is cancelled. One thread for every call of the process."""

    def __init__(self) -> None:
        self.calls: set[_Watched] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, call: Any, alive: Callable[[], bool]) -> Iterator[_Watched]:
        w = _Watched(call, alive)
        with self.lock:
            self.calls.add(w)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="baton-call-watch", daemon=True)
                self.thread.start()
        try:
            yield w
        finally:
            with self.lock:
                self.calls.discard(w)

    def _run(self) -> None:
        while True:
            time.sleep(ALIVE_CHECK_S)
            with self.lock:
                calls = list(self.calls)
            for w in calls:
                if not w.alive():
                    w.gave_up = True              # before cancel(): the caller sees the flag with the error
                    w.gave_up = bool(w.call.cancel())


_watch = _Watch()


class Loopback:
    """Calls on one node's gRPC endpoint; one channel, shared by every request thread (gRPC channels
    are thread-safe). Every call has a deadline of `timeout_s` (0: none), so no request thread waits
    for ever on a stage that hangs."""

    def __init__(self, address: str, timeout_s: float = 0.0, stage_key: str = "") -> None:
        self.timeout = timeout_s or None
        self.stage_key = stage_key
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def call(self, model: str, arrays: Arrays, outputs: list[str], alive: Callable[[], bool] | None = None) -> Arrays:
        """One unary call. `alive`, when given, is asked every ALIVE_CHECK_S while the call waits: once
        it says False the call is cancelled (FrontError "unavailable"), not left to its deadline."""
        req = encode(model, arrays, outputs, self.stage_key)
        try:
            if alive is None:
                return decode(self.stub.ModelInfer(req, timeout=self.timeout))
            fut = self.stub.ModelInfer.future(req, timeout=self.timeout)
            with _watch.watching(fut, alive):
                try:
                    return decode(fut.result())
                except grpc.FutureCancelledError:
                    raise FrontError(f"{model} call given up: {GIVEN_UP}", "unavailable") from None
        except grpc.RpcError as e:
            raise FrontError(e.details() or str(e.code()), _CODES.get(e.code(), "error")) from None

    def stream(self, model: str, arrays: Arrays, outputs: list[str],
               alive: Callable[[], bool] | None = None) -> Iterator[Arrays]:
        """A decoupled model's responses, to the last. Left early (the caller raised or closed the
        generator), the call is cancelled rather than left streaming to no one. `alive`: as in call()."""
        call = self.stub.ModelStreamInfer(iter([encode(model, arrays, outputs, self.stage_key)]),
                                          timeout=self.timeout and self.timeout + STREAM_GRACE_S)
        w = None
        try:
            with _watch.watching(call, alive) if alive is not None else contextlib.nullcontext() as w:
                for r in call:
                    if r.error_message:
                        raise FrontError(r.error_message, "error")
                    yield decode(r.infer_response)
        except grpc.RpcError as e:
            if w is not None and w.gave_up:
                raise FrontError(f"{model} stream given up: {GIVEN_UP}", "unavailable") from None
            raise FrontError(e.details() or str(e.code()), _CODES.get(e.code(), "error")) from None
        finally:
            call.cancel()                             # a no-op once the stream has ended

    def close(self) -> None:
        self.channel.close()
