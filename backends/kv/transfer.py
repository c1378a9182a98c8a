"""KV blocks between nodes over the Mooncake transfer engine, and the acknowledgement that ends a
prefill node's hold on them.

A node that serves blocks (a PD prefill node) registers its whole pool with a TransferEngine in its
KV manager process and publishes a `BlockSource`: its engine's segment name (host:rpc port), the
pool's base address and the block size in bytes. Blocks are block-major (kv/pool.py), so block b
is one contiguous span at base + b * block_bytes; a node that pulls (PD decode) registers its own
mapping of its pool and reads spans straight into its blocks (`TransferAgent.read`).

When decode has the blocks it sends `ack` to the source's KV manager over TCP: the manager checks
the MAC (the cluster's key), and that the blocks are still held for that request (then the read saw
intact data), and releases them. A failed ack means the read may have raced a lease expiry: decode
recomputes instead of trusting the blocks."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from dataclasses import asdict, dataclass

import zmq

from ..runtime import lower_priority

# How long decode waits for a source's KV manager to answer an ack.
ACK_TIMEOUT_S = 5.0


class TransferError(RuntimeError):
    """A transfer or its acknowledgement failed: the caller recomputes the K/V instead."""


@dataclass(frozen=True)
class BlockSource:
    """Where a handle's blocks can be read from (carried in the signed KVHandle as JSON)."""

    node_id: str
    segment: str           # the source's transfer engine: "host:rpc_port"
    base: int              # the pool's address in the source's KV manager process
    block_bytes: int
    ack: str               # the source KV manager's ack endpoint, "tcp://host:port"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> BlockSource:
        return cls(**json.loads(s))


def _engine(host: str, protocol: str, device: str = ""):  # noqa: ANN202 (mooncake has no stubs)
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise TransferError(f"the Mooncake transfer engine is not installed ({e}); install the project's `pd` "
                            "extra (mooncake-transfer-engine-non-cuda on CPU hosts) and libibverbs1") from None
    eng = TransferEngine()
    # P2PHANDSHAKE: peers exchange segment metadata directly; no metadata server to run
    if eng.initialize(host, "P2PHANDSHAKE", protocol, device) != 0:
        raise TransferError(f"the transfer engine could not start on {host} ({protocol})")
    return eng


MADV_POPULATE_WRITE = 23          # Linux 5.14+
TRANSFER_NICE = 10                # a reader's threads, below the decode loop (nice 0)


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")} - {os.getpid()}


def populate(base: int, size: int) -> bool:
    """Map every page of [base, base + size) writable in this process now. A pool mapped from
    /dev/shm faults on each page's first write in each process (measured: a 24.6 MB read into fresh
    pages ran at half the transfer engine's speed); a reader takes those faults once, here."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    start = base - base % page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, size + (base - start), MADV_POPULATE_WRITE) == 0


class TransferAgent:
    """One process's transfer engine with one registered region (its mapping of the node's pool)."""

    def __init__(self, host: str, protocol: str, base: int, size: int, device: str = "") -> None:
        populate(base, size)
        self._threads_before = _threads()
        self.engine = _engine(host, protocol, device)
        if self.engine.register_memory(base, size) != 0:
            raise TransferError(f"could not register {size} bytes at {base:#x} with the transfer engine")
        self.base, self.size = base, size
        self.segment = f"{host}:{self.engine.get_rpc_port()}"

    def deprioritize(self, nice: int = TRANSFER_NICE) -> None:
        """Lower the OS priority of every thread started since this agent was made (the transfer
        engine's, and readers started later), so that on a busy core the decode loop's steps come
        first and a read takes what is left: a tcp read copies through this process's CPU."""
        lower_priority(nice, _threads() - self._threads_before)

    def read(self, source: BlockSource, remote_blocks: list[int], local_blocks: list[int]) -> int:
        """Copy the source's blocks into ours, in one batch (runs of consecutive ids merged). Returns
        the bytes moved. Blocks the calling thread; the engine releases the GIL meanwhile."""
        if len(remote_blocks) != len(local_blocks):
            raise ValueError("remote and local block lists differ in length")
        bb = source.block_bytes
        local, remote, lengths = [], [], []
        for r, loc in zip(remote_blocks, local_blocks):
            if lengths and remote[-1] + lengths[-1] == source.base + r * bb and local[-1] + lengths[-1] == self.base + loc * bb:
                lengths[-1] += bb
            else:
                local.append(self.base + loc * bb)
                remote.append(source.base + r * bb)
                lengths.append(bb)
        if not lengths:
            return 0
        if self.engine.batch_transfer_sync_read(source.segment, local, remote, lengths) != 0:
            raise TransferError(f"reading {len(remote_blocks)} blocks from {source.node_id} ({source.segment}) failed")
        return sum(lengths)


def ack_mac(key: bytes, request_id: str, blocks: list[int]) -> str:
    return hmac.new(key, f"{request_id}:{','.join(map(str, blocks))}".encode(), hashlib.sha256).hexdigest()


_sockets = threading.local()        # per thread: endpoint -> a connected REQ socket (a TCP connect saved per ack)


def ack(source: BlockSource, key: bytes, request_id: str, blocks: list[int], timeout_s: float = ACK_TIMEOUT_S) -> bool:
    """Tell the source its blocks for `request_id` were read: True when it still held them (the read
    saw intact data) and has now let them go."""
    socks = _sockets.__dict__.setdefault("by_endpoint", {})
    sock = socks.get(source.ack)
    if sock is None:
        sock = socks[source.ack] = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        sock.connect(source.ack)
    try:
        sock.send(json.dumps({"request_id": request_id, "blocks": blocks,
                              "mac": ack_mac(key, request_id, blocks)}).encode())
        return bool(json.loads(sock.recv()).get("ok"))
    except zmq.ZMQError as e:
        sock.close()                     # a REQ socket without its reply cannot send again
        del socks[source.ack]
        raise TransferError(f"no acknowledgement from {source.node_id} at {source.ack}: {e}") from None


def parse_ack(msg: bytes, key: bytes) -> tuple[str, list[int]] | None:
    """An ack's (request id, blocks) when its MAC is right, else None. Never unpickles: the socket
    is reachable from the network."""
    try:
        d = json.loads(msg)
        rid, blocks, mac = str(d["request_id"]), [int(b) for b in d["blocks"]], str(d["mac"])
    except (ValueError, KeyError, TypeError):
        return None
    return (rid, blocks) if hmac.compare_digest(mac, ack_mac(key, rid, blocks)) else None
