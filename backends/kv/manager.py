"""The node's KV manager: owns the shared pool's allocation, reference counts and prefix index.

One process per node (started by `baton serve`). Stages reach it over a ZeroMQ REQ/REP socket on a
local ipc path and batch their work: a client buffers releases and publishes, and keeps a small
reserve of free blocks, so a decode step costs at most one round trip (usually none).

    python -m baton.backends.kv.manager --pool NAME --address ipc:///run/kv.sock --blocks N ...
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import time
from collections.abc import Iterable

import zmq

from ..runtime import die_with_parent
from .block_manager import BlockManager, OutOfBlocks
from .pool import KVPool, PoolSpec

# How long a stage waits for the KV manager (it answers in ~40 us; only a dead one takes longer).
TIMEOUT_S = 5.0


# How long prefill's blocks wait for the decode that adopts them; then they are released.
HANDOFF_LEASE_S = 60.0


class KVManagerUnavailable(RuntimeError):
    """The node's KV manager did not answer: a server fault, not the client's."""


class KVManagerServer:
    def __init__(self, bm: BlockManager, address: str) -> None:
        self.bm = bm
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.bind(address)
        self.calls = 0
        self.busy_s = 0.0
        self.handoffs: dict[str, tuple[list[int], float]] = {}   # request id -> (blocks, lease end)
        self.lease_s = HANDOFF_LEASE_S
        self.acks: zmq.Socket | None = None      # PD prefill: other nodes' "I have read them" (kv/transfer.py)
        self.ack_key = b""
        self.acked = 0
        self.tiers = None                        # kv.tiers.TierStack when the node has KV tiers

    def serve_acks(self, endpoint: str, key: bytes) -> str:
        """Also answer acks from decode nodes on a TCP endpoint ("tcp://host:*" picks a port);
        returns the bound address."""
        self.acks = self.ctx.socket(zmq.REP)
        self.acks.bind(endpoint)
        self.ack_key = key
        return self.acks.getsockopt_string(zmq.LAST_ENDPOINT)

    def handle_ack(self, msg: bytes) -> bytes:
        from .transfer import parse_ack

        self.expire_handoffs()
        parsed = parse_ack(msg, self.ack_key)
        ok = parsed is not None and self.handle([("claim", parsed)])[0]
        if ok:
            self.bm.release(parsed[1])
            self.acked += 1
        return json.dumps({"ok": bool(ok)}).encode()

    def handle(self, ops: list[tuple]) -> list:
        """Apply a batch of (op, arg) in order; every reply carries the free-block count."""
        self.expire_handoffs()
        out = []
        for op, arg in ops:
            if op == "release":
                self.bm.release(arg)
                out.append(None)
            elif op == "publish":
                for b, h in arg:
                    self.bm.cache_block(b, h)
                out.append(None)
            elif op == "alloc":
                try:
                    out.append(self.bm.allocate(arg))
                except OutOfBlocks:
                    out.append(None)
            elif op == "match":
                out.append(self.bm.match_prefix(arg))
            elif op == "handoff":          # prefill keeps these blocks for `request_id` until claimed
                request_id, blocks = arg
                self.handoffs[request_id] = (list(blocks), time.monotonic() + self.lease_s)
                out.append(None)
            elif op == "claim":            # decode takes them over: once, and only exactly those
                request_id, blocks = arg
                rec = self.handoffs.get(request_id)
                ok = rec is not None and rec[0] == list(blocks)
                if ok:
                    del self.handoffs[request_id]
                out.append(ok)
            elif op == "hashes":           # the newest `arg` cached block hashes (the name service's summary)
                out.append(list(self.bm.cached)[-arg:])
            elif op.startswith("tier_"):
                out.append(self.tier_op(op, arg))
            elif op == "stats":
                out.append({"num_blocks": self.bm.num_blocks, "num_used": self.bm.num_used,
                            "handoffs": len(self.handoffs), "acked": self.acked, "cached": len(self.bm.cached),
                            "hits": self.bm.hits, "queries": self.bm.queries, "calls": self.calls,
                            "busy_us_per_call": 1e6 * self.busy_s / max(1, self.calls)})
            else:
                raise ValueError(f"unknown KV manager op {op!r}")
        return out

    def tier_op(self, op: str, arg: object) -> object:
        """The KV tiers' calls from the stages' TierConnectors (kv/tier_connector.py RemoteTiers)."""
        t = self.tiers
        if t is None:
            raise ValueError("this node has no KV tiers (kv_tiers in the profile)")
        if op == "tier_lookup":
            found = t.lookup(arg)
            return found.pool_blocks, found.tiers
        if op == "tier_load":
            return t.load(*arg)
        if op == "tier_poll":
            return t.poll(arg)
        if op == "tier_names":
            return t.names
        if op == "tier_stats":
            return t.stats()
        if op == "tier_summary":
            return t.summary(arg)
        raise ValueError(f"unknown KV manager op {op!r}")

    def expire_handoffs(self) -> None:
        """Blocks handed off but never claimed (a prefill whose decode never came) go back."""
        now = time.monotonic()
        for rid in [r for r, (_, deadline) in self.handoffs.items() if deadline < now]:
            self.bm.release(self.handoffs.pop(rid)[0])

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.acks is not None:
            poller.register(self.acks, zmq.POLLIN)
        while True:
            events = dict(poller.poll(1000 if self.tiers is None else 20))
            if self.tiers is not None:
                self.tiers.collect()             # pins of finished tier copies
            if not events:
                self.expire_handoffs()
                continue
            if self.acks is not None and self.acks in events:
                self.acks.send(self.handle_ack(self.acks.recv()))
            if self.sock not in events:
                continue
            msg = self.sock.recv()
            t = time.perf_counter()
            try:
                reply = ("ok", self.handle(pickle.loads(msg)), self.bm.num_free)
            except Exception as e:  # a bad call must not kill the node's manager
                reply = ("error", repr(e), self.bm.num_free)
            self.calls += 1
            self.busy_s += time.perf_counter() - t
            self.sock.send(pickle.dumps(reply))


class RemoteBlockManager:
    """BlockManager's interface over the manager socket (what the scheduler and stages call)."""

    def __init__(self, address: str, num_blocks: int, block_size: int, reserve: int = 8,
                 timeout_s: float = TIMEOUT_S) -> None:
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        # a dead manager must fail a call, not hang the stage: bounded waits, and a REQ socket that may
        # send again after an unanswered request
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self.sock.setsockopt(zmq.REQ_RELAXED, 1)
        self.sock.setsockopt(zmq.REQ_CORRELATE, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = address
        self.sock.connect(address)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reserve_target = reserve
        self.reserve: list[int] = []          # free blocks held by this stage, handed out locally
        self.pending: list[tuple] = []        # buffered release/publish ops
        self.remote_free = num_blocks

    def _call(self, ops: list[tuple]) -> list:
        ops = self.pending + ops
        self.pending = []
        try:
            self.sock.send(pickle.dumps(ops))
            status, result, free = pickle.loads(self.sock.recv())
        except zmq.Again:
            raise KVManagerUnavailable(f"the KV manager at {self.address} did not answer") from None
        self.remote_free = free
        if status != "ok":
            raise RuntimeError(f"KV manager: {result}")
        return result

    @property
    def num_free(self) -> int:
        return self.remote_free + len(self.reserve)

    @property
    def num_used(self) -> int:
        return self.stats()["num_used"]

    def allocate(self, n: int) -> list[int]:
        if n <= len(self.reserve):
            out, self.reserve = self.reserve[:n], self.reserve[n:]
            return out
        want = n - len(self.reserve) + self.reserve_target
        got = self._call([("alloc", want)])[-1]
        if got is None and self.remote_free >= n - len(self.reserve):   # enough, but not for the reserve too
            got = self._call([("alloc", n - len(self.reserve))])[-1]
        if got is None:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free} free")
        blocks = self.reserve + got
        out, self.reserve = blocks[:n], blocks[n:]
        return out

    def release(self, blocks: Iterable[int]) -> None:
        blocks = list(blocks)
        if blocks:
            self.pending.append(("release", blocks))

    def cache_block(self, block: int, h: int) -> None:
        if self.pending and self.pending[-1][0] == "publish":
            self.pending[-1][1].append((block, h))
        else:
            self.pending.append(("publish", [(block, h)]))

    def match_prefix(self, hashes: list[int]) -> list[int]:
        return self._call([("match", hashes)])[-1] if hashes else []

    def hand_off(self, request_id: str, blocks: list[int]) -> None:
        """Record that `request_id` now owns these blocks, for decode to claim (sent with the next call)."""
        self.pending.append(("handoff", (request_id, list(blocks))))

    def claim(self, request_id: str, blocks: list[int]) -> bool:
        """Take over blocks handed off for `request_id`: True once, for exactly the recorded blocks."""
        return bool(self._call([("claim", (request_id, list(blocks)))])[-1])

    def flush(self, idle: bool = False) -> None:
        """Send buffered releases/publishes now. `idle`: also give back the local reserve, so an
        idle stage holds no blocks. Not thread-safe: one client per thread (a REQ socket)."""
        if idle and self.reserve:
            self.release(self.reserve)
            self.reserve = []
        if self.pending:
            self._call([])

    def stats(self) -> dict:
        return self._call([("stats", None)])[-1]

    def cached_hashes(self, limit: int) -> list[int]:
        return self._call([("hashes", limit)])[-1]


class RemoteTiers:
    """kv.tiers.TierStack's lookup / load / poll, answered by the node's KV manager over the stage's
    manager socket (the thread that owns `bm` calls these: the engine's)."""

    def __init__(self, bm: RemoteBlockManager) -> None:
        self.bm = bm
        self.names: list[str] = bm._call([("tier_names", None)])[-1]

    def lookup(self, hashes: list[int]):  # noqa: ANN201 - kv.tiers.Lookup
        from .tiers import Lookup

        return Lookup(*self.bm._call([("tier_lookup", hashes)])[-1])

    def load(self, load_id: str, blocks: list[int], hashes: list[int], tiers: list[int]) -> None:
        self.bm.pending.append(("tier_load", (load_id, blocks, hashes, tiers)))   # goes with the next call

    def poll(self, load_id: str) -> int | None:
        return self.bm._call([("tier_poll", load_id)])[-1]

    def collect(self) -> None:
        """The manager gives its pins back itself."""

    def stats(self) -> dict:
        return self.bm._call([("tier_stats", None)])[-1]

    def summary(self, limit: int) -> dict[str, list[int]]:
        """Each tier's newest `limit` keys (a PD node's heartbeat)."""
        return self.bm._call([("tier_summary", limit)])[-1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="baton kv-manager")
    ap.add_argument("--pool", required=True, help="name of the KV pool to create")
    ap.add_argument("--address", required=True)
    ap.add_argument("--spec", required=True, help="PoolSpec as key=value,... ")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--transfer-host", default="", help="serve the pool's blocks to other nodes from this address")
    ap.add_argument("--transfer-protocol", default="tcp", help="the Mooncake transport: tcp, or rdma on clusters")
    ap.add_argument("--key-file", default="", help="the cluster's key (hex), which signs acks")
    ap.add_argument("--node-id", default="")
    ap.add_argument("--tiers", default="", help="the kv_tiers table (JSON) of the node's engine config")
    ap.add_argument("--model", default="", help="the checkpoint (its fingerprint keys the tiers)")
    a = ap.parse_args(argv)
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:           # the launcher died before we asked to follow it
        return
    fields = dict(kv.split("=") for kv in a.spec.split(","))
    spec = PoolSpec(**{k: (v if k == "dtype" else int(v)) for k, v in fields.items()})
    pool = KVPool.create(a.pool, spec)
    bm = BlockManager(spec.num_blocks, spec.block_size, not a.no_prefix_caching)
    server = KVManagerServer(bm, a.address)
    if a.tiers:
        from .tiers import open_tiers

        server.tiers = open_tiers(json.loads(a.tiers), a.model, pool, bm)
    source = ""
    if a.transfer_host:                  # a PD prefill node: other nodes read its blocks
        from .transfer import BlockSource, TransferAgent

        nbytes = pool.tensor.numel() * pool.tensor.element_size()
        agent = TransferAgent(a.transfer_host, a.transfer_protocol, pool.tensor.data_ptr(), nbytes)
        ack = server.serve_acks(f"tcp://{a.transfer_host}:*", bytes.fromhex(open(a.key_file).read().strip()))
        source = " source=" + BlockSource(a.node_id, agent.segment, agent.base, spec.block_bytes, ack).to_json()

    def stop(*_: object) -> None:
        if server.tiers is not None:
            for tier in server.tiers.tiers:
                tier.close()
        pool.close()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"kv-manager ready pool={a.pool} blocks={spec.num_blocks} at {a.address}{source}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
