"""The decode loop (the only one: the Triton model and the tests both run it) in its own process,
driven from that process's MAIN thread (OpenMP regions entered from other threads measured ~30%
slower here), talking to the decode model's stub over a ZeroMQ PAIR socket with the typed messages
of stages.messages:

  stub -> worker: AddRequest(key, handle) | Cancel(key) | Stop()
  worker -> stub: Ready() once, then StepDeltas([(key, delta, final), ...]) | Failed(key, message), one
                  batch per engine step; Stats(metric deltas) ~once a second and on going idle

    python -P -m baton.backends.stages.decode_worker --address ipc://... --node-config RUN_DIR/node.json
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from ..runtime import die_with_parent
from ..serving.config import NodeConfig
from .cancel import CancelInbox
from .common import core_share, node_engine
from .decode import DecodeStage
from .messages import AddRequest, Cancel, Failed, KVHandle, Ready, Stats, StepDeltas, Stop, TokenDelta
from .metrics import DECODE

# How often the relay asks Triton whether its live requests were cancelled. Each ask is an IPC round
# trip per request; asking on every streamed token cost the server ~0.3 ms of CPU per token.
CANCEL_POLL_S = 0.05
# How often the worker sends its metric deltas while busy (each becomes IPC calls in the stub).
STATS_EVERY_S = 1.0


class _WorkerSink:
    def __init__(self, key: int, outbox: list, cancelled: set) -> None:
        self.key, self.outbox, self._cancelled = key, outbox, cancelled

    def send(self, delta: TokenDelta, final: bool) -> None:
        self.outbox.append((self.key, delta, final))

    def error(self, message: str, unavailable: bool = False) -> None:
        self.outbox.append(Failed(self.key, message))

    def cancelled(self) -> bool:
        return self.key in self._cancelled


def serve(node: NodeConfig, address: str, cancel_address: str | None = None) -> None:
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.connect(address)
    inbox = CancelInbox(cancel_address) if cancel_address else None
    stage = DecodeStage(node_engine(node, "decode"), bytes.fromhex(node.handle_key),
                        responses_per_step=node.serving.stream_responses_per_step,
                        embeddings=node.embedding_store_client(), transfer_host=node.epd_host)
    cores = core_share(node, "decode")
    if cores:
        stage.engine.cores_contended = cores.other_busy
    parent = os.getppid()
    outbox: list = []
    cancelled: set[int] = set()
    sock.send(pickle.dumps(Ready()))
    sent: dict = {}
    next_stats = time.monotonic() + STATS_EVERY_S

    def send_stats(only_if_counted: bool = False) -> None:
        nonlocal next_stats
        next_stats = time.monotonic() + STATS_EVERY_S
        deltas = stage.metrics(sent)
        if only_if_counted and not any(v for k, v in deltas.items() if DECODE[k.partition("|")[0]][0] == "counter"):
            return
        sock.send(pickle.dumps(Stats(deltas)))

    def flush() -> None:
        if not outbox:
            return
        deltas = []
        for item in outbox:
            if isinstance(item, Failed):
                cancelled.discard(item.key)
                sock.send(pickle.dumps(item))
            else:
                deltas.append(item)
                if item[2]:
                    cancelled.discard(item[0])
        if deltas:
            sock.send(pickle.dumps(StepDeltas(deltas)))
        outbox.clear()

    while True:
        idle = not stage.live
        if idle:
            send_stats(only_if_counted=True)                 # the last deltas, before sleeping
            if cores:
                cores.idle()
            stage.engine_housekeeping()
            stage.engine.block_manager.flush(idle=True)      # idle: hold no blocks
            if os.getppid() != parent:                       # the stub is gone (killed): so are we
                return
        arrivals = []
        # block while idle; otherwise just drain what has arrived
        while sock.poll(500 if idle and not arrivals else 0):
            msg = pickle.loads(sock.recv())
            if isinstance(msg, AddRequest):
                arrivals.append((msg.handle, _WorkerSink(msg.key, outbox, cancelled)))
            elif isinstance(msg, Cancel):
                cancelled.add(msg.key)
            elif isinstance(msg, Stop):
                return
            idle = False
        if not arrivals and not stage.live:
            continue
        if inbox is not None:
            stage.cancel(inbox.take())
        if arrivals:
            stage.admit(arrivals)
            flush()                      # first tokens out before the step, not after it
        if cores:
            if cores.holds_decode():     # a prefill runs first: coalesced tokens go out before the wait
                stage.release_held()
                flush()
            cores.busy()
        stage.step_once()
        if cores:
            cores.stepped()
        flush()
        if stage.live and stage.engine.idle_step:
            sock.poll(1)                 # every live request waits for its KV: no spinning on the core the read needs
        if time.monotonic() >= next_stats:
            send_stats()


class DecodeProxy:
    """In the Triton stub: forwards requests to the worker and relays its outputs to the sinks.
    The relay thread owns the worker socket (ZeroMQ sockets are not thread-safe); submit() queues
    and wakes it through an inproc socket."""

    def __init__(self, address: str, spawn: Callable[[], object],
                 on_stats: Callable[[dict], None] | None = None) -> None:
        ctx = zmq.Context.instance()
        self.on_stats = on_stats
        self.sock = ctx.socket(zmq.PAIR)
        self.sock.bind(address)
        self.proc = spawn()
        while not self.sock.poll(500):                  # wait for the worker's engine to load
            if self.proc.poll() is not None:
                raise RuntimeError(f"the decode worker exited with code {self.proc.returncode} while loading "
                                   "(its traceback is in the server log above)")
        msg = pickle.loads(self.sock.recv())
        if not isinstance(msg, Ready):
            raise RuntimeError(f"decode worker: expected Ready, got {msg!r}")
        self.dead: str | None = None                    # why the worker is gone, once it is
        wake = f"inproc://baton-decode-{id(self)}"
        self.wake_pull = ctx.socket(zmq.PULL)
        self.wake_pull.bind(wake)
        self.wake_push = ctx.socket(zmq.PUSH)           # used by the stub's main thread only
        self.wake_push.connect(wake)
        self.queue: list[tuple] = []
        self.lock = threading.Lock()
        self.sinks: dict[int, object] = {}
        self.next_key = 0
        self.thread = threading.Thread(target=self._relay, name="baton-decode-relay", daemon=True)
        self.thread.start()

    def submit(self, handle: KVHandle, sink: object) -> None:
        with self.lock:
            if self.dead:
                sink.error(self.dead, unavailable=True)
                return
            key = self.next_key
            self.next_key += 1
            self.sinks[key] = sink
            self.queue.append(AddRequest(key, handle))
        self.wake_push.send(b"")

    def _relay(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        next_check = 0.0
        while True:
            events = dict(poller.poll(int(CANCEL_POLL_S * 1000)))
            if self.proc.poll() is not None:
                self._worker_died()
                return
            if self.wake_pull in events:
                while self.wake_pull.poll(0):
                    self.wake_pull.recv()
                with self.lock:
                    out, self.queue = self.queue, []
                for msg in out:
                    self.sock.send(pickle.dumps(msg))
                    if isinstance(msg, Stop):
                        return
            if self.sock in events:
                msg = pickle.loads(self.sock.recv())
                if isinstance(msg, Stats):
                    if self.on_stats is not None:
                        try:
                            self.on_stats(msg.values)
                        except Exception as e:       # metrics must never stop the token relay
                            print(f"baton decode: metrics update failed: {e}", file=sys.stderr, flush=True)
                elif isinstance(msg, Failed):
                    sink = self.sinks.pop(msg.key, None)
                    if sink is not None:
                        sink.error(msg.message)
                elif isinstance(msg, StepDeltas):
                    for key, delta, final in msg.items:
                        sink = self.sinks.get(key)
                        if sink is None:
                            continue
                        try:
                            sink.send(delta, final)
                        except Exception as e:       # one broken response stream must not stop the relay
                            print(f"baton decode: request {delta.request_id}: sending failed ({e!r}); cancelling",
                                  file=sys.stderr, flush=True)
                            self.sinks.pop(key, None)
                            if not final:
                                self.sock.send(pickle.dumps(Cancel(key)))
                            continue
                        if final:
                            self.sinks.pop(key, None)
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + CANCEL_POLL_S
            for key, sink in list(self.sinks.items()):   # is_cancelled() is a round trip to the server
                if not getattr(sink, "cancel_sent", False) and sink.cancelled():
                    sink.cancel_sent = True
                    self.sock.send(pickle.dumps(Cancel(key)))

    def _worker_died(self) -> None:
        """Every request it held ends now with an error that says so; later ones are refused at once
        (the launcher's supervision stops the node)."""
        with self.lock:
            self.dead = (f"decode worker (pid {self.proc.pid}) exited with code {self.proc.returncode}; "
                         "this node cannot decode")
            sinks, self.sinks, self.queue = list(self.sinks.values()), {}, []
        print(f"baton decode: {self.dead}; failing {len(sinks)} live requests", file=sys.stderr, flush=True)
        for sink in sinks:
            try:
                sink.error(self.dead, unavailable=True)
            except Exception as e:           # a broken response stream must not stop the others' errors
                print(f"baton decode: could not report it on a stream: {e!r}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        with self.lock:
            if self.dead:
                return
            self.queue.append(Stop())
        self.wake_push.send(b"")
        self.thread.join(5)


def worker_command(address: str, node_config: str, cancel_address: str = "") -> list[str]:
    """The worker's command line; -P keeps the working directory off sys.path (a checkout's top-level
    folders must not become importable under other names). Inside a Triton stub sys.executable is the
    stub binary, so the venv's python3 (first on the stub's PATH) runs it there."""
    python = sys.executable if Path(sys.executable).name.startswith("python") else (shutil.which("python3") or "python3")
    return [python, "-P", "-m", "baton.backends.stages.decode_worker", "--address", address,
            "--node-config", node_config] + (["--cancel-address", cancel_address] if cancel_address else [])


def main() -> None:
    ap = argparse.ArgumentParser(prog="baton decode-worker")
    ap.add_argument("--address", required=True)
    ap.add_argument("--node-config", required=True, help="the node's node.json")
    ap.add_argument("--cancel-address", default=None, help="where the front sends request ids to drop")
    a = ap.parse_args()
    parent = os.getppid()
    die_with_parent()                    # the stub killed: so are we
    if os.getppid() != parent:
        return
    serve(NodeConfig.load(a.node_config), a.address, a.cancel_address)


if __name__ == "__main__":
    main()
