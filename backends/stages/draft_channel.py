"""Decode's per-step call to the `draft` stage over a node-local socket, beside its Triton endpoint.

Through tritonserver a call is a gRPC round trip plus the Python stub's IPC: ~0.5 ms measured, as
much as a baton-tiny decode step on 2 cores, on every step. The draft model stays its own Triton
model (process, instance group, KV blocks); its stub also serves the same DraftCall on a ZeroMQ ROUTER
socket in the node's private run directory (0700), as decode's stub talks to its worker. Calls from
another server still go through Triton (spec/remote.py picks by the address: ipc://... or host:port).

Wire format: no pickle. A message is a call id and the int64 arrays of DraftCall.to_arrays() /
DraftReply.to_arrays(), each as its length then its values, in the order of serving/tensors.py."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from ..serving.tensors import DRAFT_CALL, DRAFT_REPLY

log = logging.getLogger("baton.draft")

Arrays = dict[str, np.ndarray]
OK, FAILED = b"ok", b"failed"
# How long a call waits for its connection to the stage before it fails: a dead stage costs decode
# this once per back-off (spec/remote.py), not the call's whole deadline.
CONNECT_WAIT_S = 0.1


def pack(arrays: Arrays, names: list[str]) -> bytes:
    parts = []
    for n in names:
        a = np.asarray(arrays[n], dtype=np.int64).reshape(-1)
        parts += [np.asarray([a.size], dtype=np.int64), a]
    return np.concatenate(parts).tobytes()


def unpack(buf: bytes, names: list[str]) -> Arrays:
    """The arrays of `pack`; a ValueError naming what is wrong for a malformed message."""
    if len(buf) % 8:
        raise ValueError("draft channel: a message is whole int64 values")
    flat, out, r = np.frombuffer(buf, dtype=np.int64), {}, 0
    for n in names:
        if r >= flat.size or not 0 <= flat[r] <= flat.size - r - 1:
            raise ValueError(f"draft channel: array {n!r} is missing or longer than the message")
        size = int(flat[r])
        out[n], r = flat[r + 1:r + 1 + size], r + 1 + size
    if r != flat.size:
        raise ValueError("draft channel: bytes after the last array")
    return out


CALL_NAMES = [n for n, _, _ in DRAFT_CALL]
REPLY_NAMES = [n for n, _, _ in DRAFT_REPLY]


class DraftChannelServer:
    """In the draft stage's stub: a thread answering calls with `handle` (which the stub also runs
    for Triton's calls, under one lock). A call that fails is answered with its message, and the
    thread goes on."""

    def __init__(self, address: str, handle: Callable[[Arrays], Arrays]) -> None:
        self.handle = handle
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="baton-draft-channel", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while not self.stopping.is_set():
                if not self.sock.poll(200):
                    continue
                frames = self.sock.recv_multipart()
                if len(frames) != 3:                       # [peer, call id, payload]
                    continue
                peer, cid, payload = frames
                try:
                    reply = [OK, pack(self.handle(unpack(payload, CALL_NAMES)), REPLY_NAMES)]
                except Exception as e:                     # noqa: BLE001 - the caller decodes without drafts
                    log.warning("draft channel: call failed: %s", e)
                    reply = [FAILED, str(e).encode()]
                self.sock.send_multipart([peer, cid, *reply])
        finally:
            # here: a zmq socket must not be closed by a thread it is not used by. A reply just sent
            # is flushed (up to 0.1 s), but DraftChannel's IMMEDIATE socket drops unread messages
            # when its peer goes, so a caller may still lose it: that call times out and decodes
            # without drafts, as for any stage that stops.
            self.sock.close(linger=100)

    def close(self, wait_s: float = 2.0) -> None:
        """Stop serving; a call still being drafted after wait_s is left to finish on the (daemon)
        thread, which then answers it (the answer may not arrive: see _serve) and closes the socket."""
        self.stopping.set()
        self.thread.join(wait_s)
        if self.thread.is_alive():
            log.warning("draft channel: a call is still running after %.1f s; its thread closes the socket", wait_s)


class DraftChannel:
    """In decode: one call at a time, each with a deadline. A DEALER socket has no request/reply
    state to wedge: a reply that comes after its call gave up carries an old id and is dropped."""

    def __init__(self, address: str, timeout_s: float, connect_wait_s: float = CONNECT_WAIT_S) -> None:
        self.address, self.timeout_ms = address, max(1, int(timeout_s * 1000))
        self.connect_wait_ms = max(1, int(connect_wait_s * 1000))
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)         # no stage listening: a call fails now, not at its deadline
        self.sock.connect(address)
        self.ids = itertools.count(1)

    def call(self, arrays: Arrays) -> Arrays:
        cid = next(self.ids).to_bytes(8, "little")
        # a connection is made in the background (at connect(), and again after the stage restarts)
        if not self.sock.poll(self.connect_wait_ms, zmq.POLLOUT):
            raise ConnectionError(f"no draft stage is listening at {self.address}")
        self.sock.send_multipart([cid, pack(arrays, CALL_NAMES)], zmq.NOBLOCK)
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            if not self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError(f"the draft stage at {self.address} did not answer in {self.timeout_ms} ms")
            frames = self.sock.recv_multipart()
            if len(frames) == 3 and frames[0] == cid:
                break                                  # else a late reply to a call that timed out
        if frames[1] != OK:
            raise RuntimeError(frames[2].decode(errors="replace"))
        return unpack(frames[2], REPLY_NAMES)

    def close(self) -> None:
        self.sock.close()
