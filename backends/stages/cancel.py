"""Cancellation by request id, from the `llm` front model to the node's decode workers.

Triton 2.51's ensemble scheduler passes a client's cancellation only to steps it schedules after
it, so a decode step already streaming never sees it. The front model (`llm`, a decoupled model
that calls preprocess, prefill and decode) is the top-level request: it sees `is_cancelled()`, and
tells every decode worker of the node to drop that request id over a local socket. Each worker binds
one PULL socket, `<run_dir>/cancel-<instance>.sock`; a sender connects to all of them."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import zmq


def cancel_address(run_dir: str, instance: str) -> str:
    return f"ipc://{run_dir}/cancel-{instance}.sock"


class CancelInbox:
    """A decode worker's side: request ids to drop."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.bind(address)

    def take(self) -> list[str]:
        out = []
        while self.sock.poll(0):
            out.append(self.sock.recv().decode())
        return out


class CancelSender:
    """The front's side: one PUSH socket per decode worker of the node (found in the run dir when
    first needed: the workers start after the front may have)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        self.socks: dict[str, zmq.Socket] = {}

    def send(self, request_id: str) -> None:
        for path in self.run_dir.glob("cancel-*.sock"):
            if str(path) not in self.socks:
                s = zmq.Context.instance().socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 10000)
                s.connect(f"ipc://{path}")
                self.socks[str(path)] = s
        for s in self.socks.values():
            try:
                s.send(request_id.encode(), zmq.NOBLOCK)
            except zmq.Again:                  # a worker gone or flooded: the supervisor sees to it
                pass


class CloseStream:
    """Cancellation when decode runs on another server (PD): closing the front's stream from that
    server cancels the gRPC call, which its decode sees as its client's cancellation."""

    def __init__(self) -> None:
        self.stream: Generator | None = None

    def send(self, request_id: str) -> None:
        if self.stream is not None:
            self.stream.close()
