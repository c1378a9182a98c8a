"""The `llm` front (profile single_node): a decoupled Python model that runs the relay itself
(preprocess -> prefill -> decode, streaming decode's responses back under the user-facing names)
instead of an ensemble, calling the stages on the node's own gRPC port (stages/loopback.py). It exists for cancellation: as the top-level request it sees the
client's cancellation (`is_cancelled()`), which Triton 2.51's ensemble never passes to a decode step
already running, and it tells the node's decode workers to drop the request (stages/cancel.py).

Each request is served on a thread of this stub (a streaming call blocks while it streams). The
Triton calls are passed in as `Calls`, so the relay logic here runs without a server in tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..serving.tensors import SCALARS
from .cancel import CancelSender, CloseStream
from .messages import ERROR_REASONS
from .postprocess import RENAME

# How often a streaming request asks Triton whether it was cancelled (each ask is an IPC round trip).
CANCEL_POLL_S = 0.05


@dataclass
class Calls:
    """The Triton operations the front needs (model.py binds them to pb_utils)."""

    preprocess: Callable[[Any], Any]              # the request's inputs -> response (raises FrontError)
    prefill: Callable[[Any], Any]                 # preprocess (or encode) outputs -> response
    decode: Callable[[Any], Iterator[Any]]        # prefill outputs -> streamed responses
    outputs: Callable[[Any], dict[str, Any]]      # a response -> {name: numpy array}
    send: Callable[[dict[str, Any] | None, bool], None]   # (renamed outputs or None, final)
    cancelled: Callable[[], bool]
    encode: Callable[[Any], Any] | None = None    # EPD: preprocess outputs with images -> their embedding handle


class FrontError(Exception):
    """A stage answered with an error; `code` is its Triton error code (kept for the client) or an
    in-band reason from decode ("error", "unavailable")."""

    def __init__(self, message: str, code: Any = None) -> None:
        super().__init__(message)
        self.code = code


class Admission:
    """Counts requests in flight through the front; past `limit` new ones are refused at once (a
    clear "server busy" rather than an unbounded queue that times out somewhere else). With
    `counter_path` the count is also kept in a small shared file, which the launcher's drain reads:
    a request is in flight until its last response has left the front, after decode freed its blocks."""

    def __init__(self, limit: int, counter_path: str | None = None) -> None:
        self.limit = limit
        self.inflight = 0
        self.lock = threading.Lock()
        self.counter = None
        if counter_path:
            Path(counter_path).write_bytes(bytes(4))
            self.counter = np.memmap(counter_path, dtype=np.int32, mode="r+", shape=(1,))

    def enter(self) -> str:
        """"" when admitted (call leave() when done), else why not."""
        with self.lock:
            if self.inflight >= self.limit:
                return (f"server busy: {self.inflight} requests in flight, the limit is {self.limit} "
                        "(max_pending_requests); retry later")
            self.inflight += 1
            if self.counter is not None:
                self.counter[0] = self.inflight
            return ""

    def leave(self) -> None:
        with self.lock:
            self.inflight -= 1
            if self.counter is not None:
                self.counter[0] = self.inflight


def requests_in_fronts(run_dir: str | Path) -> int | None:
    """Requests in flight through the node's front models (None: the node has no front)."""
    files = list(Path(run_dir).glob("front-*.inflight"))
    if not files:
        return None
    return sum(int(np.fromfile(f, dtype=np.int32, count=1)[0]) for f in files)


# Request parameters Triton itself sets or reads (a client library may add them to any request).
RESERVED = {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers", "binary_data_output"}


def check_parameters(params: dict[str, Any]) -> None:
    """Triton's HTTP generate endpoints turn every JSON key that is not a model input into a request
    parameter, so a misspelled input ("temprature") would be ignored: refuse it, naming it."""
    unknown = sorted(k for k in params if k not in RESERVED and not k.startswith("triton_"))
    if unknown:
        raise FrontError(f"{unknown[0]}: unknown input; the llm model takes text_input or messages, stop and "
                         f"{', '.join(n for n, _ in SCALARS)}", "invalid")


def has_images(outputs: dict[str, Any]) -> bool:
    spans = outputs.get("image_spans")
    return spans is not None and spans.size > 0


def relay(inputs: Any, calls: Calls, cancel: CancelSender | CloseStream, timeout_s: float = 0.0, stream: bool = True) -> str:
    """Serve one request; returns how it ended ("finished", "cancelled"). Stage errors propagate as
    FrontError (model.py turns them into the request's final error response); decode reports its own
    in band, as a last delta with finish reason "error" or "unavailable" (messages.ERROR_REASONS).
    A request still streaming `timeout_s` after it arrived (0: no limit) is dropped from decode like
    a cancelled one and ends with a FrontError ("unavailable") naming request_timeout_s. With `stream`
    false the client gets one response, every delta merged (what Triton's HTTP `generate` endpoint
    accepts); the front still reads each delta, so cancellation and the deadline work the same."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
    request = calls.preprocess(inputs)
    if calls.encode is not None and has_images(calls.outputs(request)):
        request = calls.encode(request)
    handle = calls.prefill(request)
    request_id, ended, failed = "", False, None
    next_check = time.monotonic() + CANCEL_POLL_S
    cancelled = timed_out = False
    merged: dict[str, Any] = {}
    for resp in calls.decode(handle):             # read to its end, so the call completes
        out = calls.outputs(resp)
        if not out or ended:                      # an empty closing response
            continue
        request_id = request_id or _text(out.get("d_request_id"))
        reason = _text(out.get("d_finish_reason"))
        ended = bool(reason)
        if reason in ERROR_REASONS:
            failed = FrontError(_text(out.get("d_text")), reason)
            continue
        if not cancelled and time.monotonic() >= next_check:
            next_check = time.monotonic() + CANCEL_POLL_S
            timed_out = not ended and time.monotonic() >= deadline
            if timed_out or calls.cancelled():
                cancelled = True
                cancel.send(request_id)           # decode drops it at its next step, freeing its blocks
        if not cancelled:
            user = {RENAME[k]: v for k, v in out.items() if k in RENAME}
            if stream:
                calls.send(user, ended)
            else:
                merged = _merge(merged, user)
                if ended:
                    calls.send(merged, True)
    if timed_out:
        raise FrontError(f"request {request_id} was still generating after {timeout_s:g} s, the server's "
                         "limit (request_timeout_s): it was stopped", "unavailable")
    if failed is not None and not cancelled:
        raise failed
    if not ended and not cancelled:
        raise FrontError(f"decode ended request {request_id or '?'} without a final response", "error")
    return "cancelled" if cancelled else "finished"


# Outputs that a merged (non-streamed) response concatenates; the others (usage, finish reason, id)
# are taken from the newest delta.
_CONCAT = ("text_output", "token_ids", "logprobs")


def _merge(held: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    if not held:
        return new
    out = dict(new)
    for k in _CONCAT:
        if k == "text_output":
            out[k] = np.array([_bytes(held[k]) + _bytes(new[k])], dtype=object)
        else:
            out[k] = np.concatenate([held[k].reshape(-1), new[k].reshape(-1)])
    return out


def _bytes(arr: Any) -> bytes:
    v = arr.reshape(-1)[0]
    return v if isinstance(v, bytes) else str(v).encode()


def _text(arr: Any) -> str:
    if arr is None:
        return ""
    v = arr.reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else str(v)
