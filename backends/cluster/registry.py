"""The name service of a PD cluster, on etcd (client: etcd3gw, etcd's JSON gateway).

Every node keeps one key, /baton/<cluster>/nodes/<node id>, under a lease of LEASE_TTL_S seconds
that it refreshes every HEARTBEAT_S with its current load and a summary of the KV blocks it caches.
A node that dies stops refreshing and its key disappears when the lease expires, so a reader never
sees it again after one TTL. Readers (the router's front) poll the prefix; when etcd cannot be
reached they keep the last membership they saw and say so (log warning, counter)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

log = logging.getLogger("name-service")

LEASE_TTL_S = 3
HEARTBEAT_S = 1.0
POLL_S = 0.5
HASH_SUMMARY = 4096          # newest cached block hashes a node reports


@dataclass
class NodeInfo:
    node_id: str
    role: str                  # "prefill" | "decode" | "router"
    grpc: str                  # host:port of the node's tritonserver
    block_size: int = 0        # pool layout: tokens per block, blocks, bytes per block, KV dtype
    num_blocks: int = 0
    block_bytes: int = 0
    kv_dtype: str = ""
    free_blocks: int = 0
    running: int = 0           # requests decoding (decode) or being prefilled (prefill)
    waiting: int = 0           # requests queued in Triton for the node's stage
    queued_tokens: int = 0     # prefill: prompt tokens being prefilled now
    hashes: list[str] = field(default_factory=list)   # cached block hashes, low 64 bits in hex
    # the same for the node's lower KV tiers (kv/tiers.py): "host", "store" (what it wrote to the
    # cluster's Mooncake Store, which every node reads), "disk"
    tier_hashes: dict[str, list[str]] = field(default_factory=dict)
    ts: float = 0.0            # when the node wrote this (its clock)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str | bytes) -> NodeInfo:
        d = json.loads(s)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def short_hash(h: int) -> str:
    """The form block hashes take in a node's summary (the router compares its own the same way)."""
    return format(h & 0xFFFFFFFFFFFFFFFF, "016x")


def client(url: str):  # noqa: ANN201 (etcd3gw has no stubs)
    import etcd3gw

    u = urlparse(url if "://" in url else f"http://{url}")
    return etcd3gw.client(host=u.hostname or "127.0.0.1", port=u.port or 2379, timeout=2)


def prefix(cluster: str) -> str:
    return f"/baton/{cluster}/nodes/"


class Registration:
    """Keeps this node's key alive with fresh load numbers (`info()` is called every heartbeat)."""

    def __init__(self, url: str, cluster: str, info: Callable[[], NodeInfo]) -> None:
        self.url, self.cluster, self.info = url, cluster, info
        self.client = client(url)
        self.lease = None
        self.stopped = threading.Event()
        self.errors = 0
        self.publish()                                # fails loudly at start: a wrong URL is not a warning
        self.thread = threading.Thread(target=self._run, name="baton-registration", daemon=True)
        self.thread.start()

    def publish(self) -> None:
        node = self.info()
        node.ts = time.time()
        if self.lease is None or self.lease.refresh() <= 0:     # new, or lost (etcd restarted, long stall)
            self.lease = self.client.lease(ttl=LEASE_TTL_S)
        self.client.put(prefix(self.cluster) + node.node_id, node.to_json(), lease=self.lease)

    def _run(self) -> None:
        down = False
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.publish()
                if down:
                    log.warning("name service %s reachable again", self.url)
                down = False
            except Exception as e:                    # keep serving; the key expires if this lasts
                self.errors += 1
                if not down:
                    self.lease = None                 # a new one once etcd answers (this one may be gone)
                    log.warning("name service %s unreachable (%s); this node drops out of routing after %d s",
                                self.url, e, LEASE_TTL_S)
                down = True

    def stop(self) -> None:
        """Leave the cluster now (the lease is revoked), not one TTL later."""
        self.stopped.set()
        self.thread.join(5)
        try:
            if self.lease is not None:
                self.lease.revoke()
        except Exception:                             # etcd gone: the key expires by itself
            pass


class Membership:
    """The cluster's live nodes as the name service last said, polled in the background."""

    def __init__(self, url: str, cluster: str) -> None:
        self.url, self.cluster = url, cluster
        self.client = client(url)
        self.nodes: dict[str, NodeInfo] = {}
        self.errors = 0                               # polls that failed (metric baton:name_service_errors_total)
        self.down_since: float | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.changed = threading.Condition(self.lock)
        self.poll()
        self.thread = threading.Thread(target=self._run, name="baton-membership", daemon=True)
        self.thread.start()

    def poll(self) -> None:
        try:
            rows = self.client.get_prefix(prefix(self.cluster))
        except Exception as e:
            self.errors += 1
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("name service %s unreachable (%s); routing on the last known %d nodes",
                            self.url, e, len(self.nodes))
            return
        if self.down_since is not None:
            log.warning("name service %s reachable again after %.1f s", self.url, time.monotonic() - self.down_since)
            self.down_since = None
        nodes = {}
        for value, _meta in rows:
            try:
                n = NodeInfo.from_json(value)
            except (ValueError, TypeError) as e:
                log.warning("ignoring a malformed node record: %s", e)
                continue
            nodes[n.node_id] = n
        with self.lock:
            self.nodes = nodes
            self.changed.notify_all()

    def _run(self) -> None:
        while not self.stopped.wait(POLL_S):
            self.poll()

    def of_role(self, role: str) -> list[NodeInfo]:
        with self.lock:
            return [n for n in self.nodes.values() if n.role == role]

    def wait_for(self, counts: dict[str, int], timeout: float) -> bool:
        """Until at least counts[role] nodes of each role are registered (tests, cluster up)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not all(sum(n.role == r for n in self.nodes.values()) >= c for r, c in counts.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def stop(self) -> None:
        self.stopped.set()
