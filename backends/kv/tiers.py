"""The KV tiers below the node's pool (L1): L2 host memory, L3 Mooncake Store (cluster-wide), L4
local files or Redis. One key space: a block's chained hash (kv/hashing.py) under a namespace made
of the model's fingerprint and the KV layout, so a prefix computed on one node, or before a
restart, is found by any node serving the same model with the same layout.

TierStack runs where the pool is owned (the node's KV manager; the offline engine's own process):
  lookup(hashes)            how many leading blocks the pool caches, then where each following block
                            is (one batched existence query per tier)
  load(id, blocks, ...)     copy them into allocated pool blocks on a worker thread; poll(id) says
                            how many leading blocks arrived (a failed one ends the run: the rest is
                            recomputed)
  on_cache / on_evict / on_hit
                            the write policies: a tier gets a block when the pool publishes it
                            ("through"), when the pool evicts it ("back"), or once it has been hit N
                            times ("hits:N")
Blocks being loaded hold an extra reference (a "pin"), so a cancelled request's blocks are not
reused while a copy writes into them. A write takes a copy of its block on the owner's thread
(~10 us for 100 KB) and queues that, so a slow tier never holds pool blocks."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from baton_client.schema import TIERS

from ..engine.config import ConfigError, check_types
from .file_store import FileStore, namespace

if TYPE_CHECKING:
    from .block_manager import BlockManager
    from .pool import KVPool, PoolSpec

log = logging.getLogger("kv-tiers")

# Writes queued at most: past this (a slow or stuck tier) new writes are dropped, not queued. Each
# queued write holds a copy of its block, not the block, so a stuck tier never holds pool blocks.
MAX_QUEUED_WRITES = 256

# Where each tier's tokens are counted in a response's cached_tokens_by_tier (index 0: the pool).
TIER_NAMES = TIERS
POLICIES = ("through", "back")          # and "hits:N"


@dataclass(frozen=True)
class TiersConfig:
    """The `kv_tiers` table of a profile's [engine] (and `LLM(..., kv_tiers={...})`). Every tier is
    off until given a capacity (L2, L3) or a place (L4)."""
    host_mb: int = 0                 # L2: host memory of the node's KV manager
    host_write: str = "back"
    store: str = ""                  # L3: a mooncake_master's "host:port" ("" off; "auto": baton serve starts one)
    store_metadata: str = ""         # its HTTP metadata server (default: http://<master host>:<port + 1>/metadata)
    store_mb: int = 256              # the memory this node contributes to the store
    store_host: str = "127.0.0.1"    # this node's address for the store's transfers
    store_write: str = "through"
    disk_dir: str = ""               # L4 on local files ("" off); kept across restarts
    disk_mb: int = 1024
    disk_write: str = "through"
    redis: str = ""                  # L4 on Redis instead: "host:port" ("" off; "auto": baton serve starts one)
    redis_mb: int = 1024             # the maxmemory of a Redis that baton serve starts
    redis_write: str = "through"

    def __post_init__(self) -> None:
        check_types(self, "kv_tiers")
        for f in fields(self):
            if f.name.endswith("_write"):
                parse_policy(getattr(self, f.name), f"kv_tiers.{f.name}")
            if f.name.endswith("_mb") and getattr(self, f.name) < 0:
                raise ConfigError(f"kv_tiers.{f.name}: must be >= 0")
        if self.disk_dir and self.redis:
            raise ConfigError("kv_tiers: disk_dir and redis are both L4; choose one")

    @classmethod
    def from_table(cls, table: dict[str, Any] | None) -> TiersConfig:
        table = dict(table or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in kv_tiers; known: {sorted(known)}")
        return cls(**table)

    @property
    def enabled(self) -> bool:
        return bool(self.host_mb or self.store or self.disk_dir or self.redis)

    def to_table(self) -> dict[str, Any]:
        return asdict(self)


def parse_policy(text: str, where: str) -> tuple[str, int]:
    """"through" | "back" | "hits:N" -> (kind, N)."""
    if text in POLICIES:
        return text, 0
    kind, _, n = text.partition(":")
    if kind == "hits" and n.isdigit() and int(n) >= 1:
        return "hits", int(n)
    raise ConfigError(f"{where}: expected 'through', 'back' or 'hits:N' (N >= 1), got {text!r}")


def model_fingerprint(model_dir: str | Path) -> str:
    """Identifies a checkpoint's weights without reading all of them: config.json, and per weight file
    its size, its header and 64 evenly spaced 4 KiB samples. Two random-init checkpoints of one
    config differ; the same files on two nodes agree."""
    d = Path(model_dir)
    h = hashlib.sha256()
    cfg = d / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
            for i in range(64):
                fh.seek(size * i // 64)
                h.update(fh.read(4096))
    return h.hexdigest()[:32]


def layout_key(spec: PoolSpec, tp_rank: int = 0) -> str:
    return (f"{spec.dtype}|bs{spec.block_size}|L{spec.num_layers}|kv{spec.num_kv_heads}|d{spec.head_dim}"
            f"|tp{tp_rank}")


# ---- the tiers -----------------------------------------------------------------------------------

class Tier(ABC):
    """One store of whole blocks by key. Thread-safe: the lookup runs on the caller's thread, copies
    on the stack's worker."""
    name: str          # one of TIER_NAMES
    label: str         # what it is, for logs and `baton kv stats`

    def __init__(self) -> None:
        self.stats = {"lookups": 0, "hits": 0, "bytes_read": 0, "bytes_written": 0, "puts": 0, "failures": 0}
        self.lock = threading.Lock()
        self.written: deque[int] = deque(maxlen=4096)      # keys this node wrote, for newest()

    @abstractmethod
    def contains(self, keys: list[int]) -> list[bool]: ...

    @abstractmethod
    def get(self, key: int, out: torch.Tensor) -> bool:
        """Read a block into `out` (uint8, its exact size): False if absent or unreadable."""

    @abstractmethod
    def put(self, key: int, data: torch.Tensor) -> bool: ...

    def used_bytes(self) -> int:
        return 0

    def newest(self, limit: int) -> list[int]:
        """Up to `limit` keys it holds, newest last (the PD router's summary of this node)."""
        return list(self.written)[-limit:]

    def close(self) -> None:  # noqa: B027 - most tiers hold nothing to release
        """Release what the tier holds in other processes (the store's registration)."""


class HostTier(Tier):
    """L2: a slab of host memory in block-sized slots, LRU."""
    name, label = "host", "host memory"

    def __init__(self, capacity_bytes: int, block_bytes: int) -> None:
        super().__init__()
        self.block_bytes = block_bytes
        self.num_slots = max(1, capacity_bytes // block_bytes)
        self.slab = torch.empty(self.num_slots, block_bytes, dtype=torch.uint8)
        self.slots: OrderedDict[int, int] = OrderedDict()     # key -> slot, oldest use first
        self.free = list(range(self.num_slots))

    def contains(self, keys: list[int]) -> list[bool]:
        with self.lock:
            return [k in self.slots for k in keys]

    def get(self, key: int, out: torch.Tensor) -> bool:
        with self.lock:
            slot = self.slots.get(key)
            if slot is None:
                return False
            self.slots.move_to_end(key)
            out.copy_(self.slab[slot])      # under the lock: the slot cannot be reused mid-copy
        return True

    def put(self, key: int, data: torch.Tensor) -> bool:
        with self.lock:
            if key in self.slots:
                self.slots.move_to_end(key)
                return True
            slot = self.free.pop() if self.free else self.slots.popitem(last=False)[1]
            self.slab[slot].copy_(data)
            self.slots[key] = slot
        return True

    def used_bytes(self) -> int:
        return len(self.slots) * self.block_bytes

    def newest(self, limit: int) -> list[int]:
        with self.lock:
            return list(self.slots)[-limit:]


class FileTier(Tier):
    """L4 on local files (kv/file_store.py): checksummed, kept across restarts."""
    name, label = "disk", "local files"

    def __init__(self, root: str, space: str, capacity_bytes: int) -> None:
        super().__init__()
        self.store = FileStore(root, space, capacity_bytes)
        self.label = f"files in {self.store.dir}"

    def contains(self, keys: list[int]) -> list[bool]:
        with self.lock:
            return self.store.contains(keys)

    def get(self, key: int, out: torch.Tensor) -> bool:
        with self.lock:
            return self.store.get(key, memoryview(out.numpy()))

    def put(self, key: int, data: torch.Tensor) -> bool:
        with self.lock:
            return self.store.put(key, memoryview(data.numpy()))

    def used_bytes(self) -> int:
        return self.store.used

    def newest(self, limit: int) -> list[int]:
        with self.lock:
            return list(self.store.lru)[-limit:]


class RedisTier(Tier):
    """L4 on a Redis server (its own maxmemory / LRU policy bounds it)."""
    name, label = "disk", "redis"

    def __init__(self, address: str, space: str) -> None:
        super().__init__()
        import redis

        host, _, port = address.rpartition(":")
        self.client = redis.Redis(host=host or "127.0.0.1", port=int(port), socket_timeout=2,
                                  socket_connect_timeout=2)
        self.prefix = f"baton:{space}:"
        self.label = f"redis at {address}"
        self.client.ping()

    def _key(self, key: int) -> str:
        return f"{self.prefix}{key:032x}"

    def contains(self, keys: list[int]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(self._key(k))
        return [bool(x) for x in pipe.execute()]

    def get(self, key: int, out: torch.Tensor) -> bool:
        data = self.client.get(self._key(key))
        if data is None or len(data) != out.numel():
            return False
        out.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return True

    def put(self, key: int, data: torch.Tensor) -> bool:
        self.client.set(self._key(key), data.numpy().tobytes(), nx=True)
        return True

    def used_bytes(self) -> int:
        try:
            return int(self.client.info("memory")["used_memory"])
        except Exception:
            return 0


class StoreTier(Tier):
    """L3: Mooncake Store. Every node is a client that mounts `capacity_bytes` of its memory into
    the cluster's store; objects are read straight into pool blocks (the pool is registered with
    the transfer engine). A master that stops answering switches the tier off, with a warning;
    it is tried again every RETRY_S."""
    name = "store"
    RETRY_S = 5.0

    def __init__(self, master: str, metadata: str, local_host: str, capacity_bytes: int, space: str,
                 pool_tensor: torch.Tensor) -> None:
        super().__init__()
        import os

        os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        if not metadata:
            host, _, port = master.rpartition(":")
            metadata = f"http://{host}:{int(port) + 1}/metadata"
        rc = self.store.setup(local_host, metadata, capacity_bytes, 16 << 20, "tcp", "", master)
        if rc != 0:
            raise RuntimeError(f"Mooncake Store at {master}: setup failed ({rc}); is mooncake_master running?")
        self.base = pool_tensor.data_ptr()
        self.nbytes = pool_tensor.numel() * pool_tensor.element_size()
        if self.store.register_buffer(self.base, self.nbytes) != 0:
            raise RuntimeError("Mooncake Store: could not register the KV pool")
        self.prefix = f"baton/{space}/"
        self.label = f"Mooncake Store at {master}"
        self.down_since = 0.0

    def _key(self, key: int) -> str:
        return f"{self.prefix}{key:032x}"

    def _up(self) -> bool:
        return not self.down_since or time.monotonic() - self.down_since > self.RETRY_S

    def _failed(self, what: str, rc: object) -> None:
        if not self.down_since:
            log.warning("KV tier L3 (%s): %s failed (%s); switched off, retried every %.0f s",
                        self.label, what, rc, self.RETRY_S)
        self.down_since = time.monotonic()
        self.stats["failures"] += 1

    def contains(self, keys: list[int]) -> list[bool]:
        if not self._up():
            return [False] * len(keys)
        rcs = self.store.batch_is_exist([self._key(k) for k in keys])
        if any(rc < 0 for rc in rcs):
            self._failed("lookup", min(rcs))
            return [False] * len(keys)
        if self.down_since:
            log.warning("KV tier L3 (%s) answers again; switched on", self.label)
            self.down_since = 0.0
        return [rc == 1 for rc in rcs]

    def get(self, key: int, out: torch.Tensor) -> bool:
        if not self._up():
            return False
        ptr = out.data_ptr()
        if not self.base <= ptr < self.base + self.nbytes:    # not a pool block: through a bytes copy
            data = self.store.get(self._key(key))
            if len(data) != out.numel():
                return False
            out.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            return True
        n = self.store.get_into(self._key(key), ptr, out.numel())
        return n == out.numel()

    def put(self, key: int, data: torch.Tensor) -> bool:
        if not self._up():
            return False
        ptr = data.data_ptr()
        if self.base <= ptr < self.base + self.nbytes:
            rc = self.store.put_from(self._key(key), ptr, data.numel())
        else:
            rc = self.store.put(self._key(key), data.numpy().tobytes())
        if rc < 0:                           # (an object that exists already answers 0)
            self._failed("write", rc)
            return False
        return True

    def close(self) -> None:
        try:
            self.store.unregister_buffer(self.base)
        except Exception:
            pass


def build_tiers(cfg: TiersConfig, spec: PoolSpec, fingerprint: str, pool_tensor: torch.Tensor) -> list[Tier]:
    """The configured tiers, L2 first. An L3 or L4 that cannot be reached at start is an error."""
    space = namespace(fingerprint, layout_key(spec))
    tiers: list[Tier] = []
    if cfg.host_mb:
        tiers.append(HostTier(cfg.host_mb << 20, spec.block_bytes))
    if cfg.store:
        tiers.append(StoreTier(cfg.store, cfg.store_metadata, cfg.store_host, cfg.store_mb << 20, space,
                               pool_tensor))
    if cfg.disk_dir:
        tiers.append(FileTier(cfg.disk_dir, space, cfg.disk_mb << 20))
    if cfg.redis:
        tiers.append(RedisTier(cfg.redis, space))
    return tiers


def policies_of(cfg: TiersConfig, tiers: list[Tier]) -> list[tuple[str, int]]:
    by_name = {"host": cfg.host_write, "store": cfg.store_write,
               "disk": cfg.redis_write if cfg.redis else cfg.disk_write}
    return [parse_policy(by_name[t.name], t.name) for t in tiers]


def open_tiers(table: dict[str, Any], model_dir: str, pool: KVPool, bm: BlockManager) -> TierStack:
    """The tiers of a `kv_tiers` table over a pool this process owns (the offline engine, a node's KV
    manager)."""
    cfg = TiersConfig.from_table(table)
    tiers = build_tiers(cfg, pool.spec, model_fingerprint(model_dir), pool.tensor)
    return TierStack(pool, bm, tiers, policies_of(cfg, tiers))


# ---- the stack -----------------------------------------------------------------------------------

@dataclass
class Lookup:
    pool_blocks: int           # leading blocks the pool (L1) caches
    tiers: list[int]           # then, per block, the index (into TierStack.tiers) of the tier that has it


class TierStack:
    def __init__(self, pool: KVPool, bm: BlockManager, tiers: list[Tier], policies: list[tuple[str, int]]) -> None:
        self.pool, self.bm, self.tiers, self.policies = pool, bm, tiers, policies
        self.blocks = pool.tensor.view(pool.spec.num_blocks, -1).view(torch.uint8)    # [block, bytes]
        self.jobs: queue.Queue = queue.Queue()
        self.unpin: queue.SimpleQueue = queue.SimpleQueue()     # blocks whose loads are done (owner thread frees)
        self.results: dict[str, tuple[int, float]] = {}          # load id -> (leading blocks loaded, when)
        self.hit_counts: dict[int, int] = {}
        self.pool_stats = {"lookups": 0, "hits": 0, "dropped_writes": 0}
        # hash -> tiers a queued write will put it in: a lookup counts them as there (a load queued
        # after the write runs after it), or a block evicted a moment ago would miss until written
        self.pending: dict[int, list[int]] = {}
        self._pending_lock = threading.Lock()
        self.closed = False
        bm.on_evict = self.on_evict
        bm.on_cache = self.on_cache
        bm.on_hit = self.on_hit if any(kind == "hits" for kind, _ in policies) else None   # not per hit if unused
        self.worker = threading.Thread(target=self._work, name="baton-kv-tiers", daemon=True)
        self.worker.start()

    # ---- owner thread (the KV manager's loop, the offline engine's step) -------------------------
    def lookup(self, hashes: list[int]) -> Lookup:
        self.collect()
        n = 0
        for h in hashes:
            if h not in self.bm.cached:
                break
            n += 1
        self.pool_stats["lookups"] += len(hashes)
        self.pool_stats["hits"] += n
        rest = hashes[n:]
        where: list[int | None] = [None] * len(rest)
        with self._pending_lock:
            queued = [self.pending.get(h, ()) for h in rest]
        for i, tier in enumerate(self.tiers):
            ask = [j for j, w in enumerate(where) if w is None]
            if not ask:
                break
            t = time.perf_counter()
            try:
                found = tier.contains([rest[j] for j in ask])
            except Exception as e:           # an unreachable tier is a miss, not a failed request
                log.warning("KV tier %s lookup failed: %s", tier.label, e)
                tier.stats["failures"] += 1
                found = [False] * len(ask)
            tier.stats["lookups"] += len(ask)
            for j, f in zip(ask, found):
                if f or i in queued[j]:
                    where[j] = i
            log.debug("tier %s: %d keys in %.2f ms", tier.name, len(ask), 1e3 * (time.perf_counter() - t))
        run = []
        for w in where:
            if w is None:
                break
            run.append(w)
        return Lookup(n, run)

    def load(self, load_id: str, blocks: list[int], hashes: list[int], tiers: list[int]) -> None:
        """Copy each hash's block from its tier into `blocks` (allocated by the caller)."""
        self._pin(blocks)
        self.jobs.put(("load", load_id, blocks, hashes, tiers))

    def poll(self, load_id: str) -> int | None:
        """None while the load runs; then the number of leading blocks now in place (once)."""
        self.collect()
        r = self.results.pop(load_id, None)
        return None if r is None else r[0]

    def on_cache(self, block: int, h: int) -> None:
        """The pool published a block."""
        self._write_to(("through", 0), block, h)

    def on_hit(self, block: int, h: int) -> None:
        n = self.hit_counts[h] = self.hit_counts.get(h, 0) + 1
        self._write_to(("hits", n), block, h)

    def on_evict(self, block: int, h: int) -> None:
        """The pool is about to reuse `block`: tiers written back get a copy of it first."""
        self.hit_counts.pop(h, None)
        self._write_to(("back", 0), block, h)

    def _write_to(self, policy: tuple[str, int], block: int, h: int) -> None:
        """Queue a copy of the block for the tiers with this policy (the copy, not the block: a slow
        or stuck tier never holds pool blocks). A full queue drops the write: a cache may miss."""
        targets = [i for i, p in enumerate(self.policies) if p == policy]
        if not targets:
            return
        if self.jobs.qsize() >= MAX_QUEUED_WRITES:
            self.pool_stats["dropped_writes"] += 1
            return
        with self._pending_lock:
            self.pending[h] = sorted(set(self.pending.get(h, [])) | set(targets))
        self.jobs.put(("write", h, targets, self.blocks[block].clone()))

    def collect(self) -> None:
        """Give back the pins of finished copies (on the thread that owns the block manager)."""
        done = []
        while True:
            try:
                done.extend(self.unpin.get_nowait())
            except queue.Empty:
                break
        if done:
            self.bm.release(done)
            stale = time.monotonic() - 60.0         # results of loads whose sequence ended meanwhile
            for k in [k for k, (_, t) in self.results.items() if t < stale]:
                del self.results[k]

    def _pin(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.bm.ref_counts[b] < 1:   # a free block may be reused at once: never copied
                raise RuntimeError(f"KV tiers: block {b} is not held")
            self.bm.ref_counts[b] += 1

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def summary(self, limit: int) -> dict[str, list[int]]:
        return {t.name: t.newest(limit) for t in self.tiers}

    def stats(self) -> dict[str, dict[str, float]]:
        self.collect()
        out = {"device": {"lookups": self.pool_stats["lookups"], "hits": self.pool_stats["hits"],
                          "used_bytes": len(self.bm.cached) * self.pool.spec.block_bytes},
               "_pending": {"jobs": self.jobs.qsize(), "dropped_writes": self.pool_stats["dropped_writes"]}}
        for t in self.tiers:
            out[t.name] = dict(t.stats, used_bytes=t.used_bytes(), label=t.label)
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.jobs.put(None)
        self.worker.join(timeout=10)
        for t in self.tiers:
            t.close()

    # ---- worker thread ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if job[0] == "load":
                    self._load(*job[1:])
                else:
                    self._write(*job[1:])
            except Exception:            # a copy must never take the node down
                log.exception("KV tier job failed")
            finally:
                self.jobs.task_done()

    def flush(self) -> None:
        """Wait until every queued copy is done (tests, `baton kv stats`, a clean stop)."""
        self.jobs.join()
        self.collect()

    def _load(self, load_id: str, blocks: list[int], hashes: list[int], tiers: list[int]) -> None:
        n = 0
        try:
            for b, h, i in zip(blocks, hashes, tiers):
                tier = self.tiers[i]
                try:
                    ok = tier.get(h, self.blocks[b])
                except Exception as e:
                    log.warning("KV tier %s read failed: %s", tier.label, e)
                    ok = False
                if not ok:
                    tier.stats["failures"] += 1
                    break
                tier.stats["hits"] += 1
                tier.stats["bytes_read"] += self.blocks.shape[1]
                n += 1
        finally:
            self.results[load_id] = (n, time.monotonic())
            self.unpin.put(blocks)

    def _write(self, h: int, targets: list[int], data: torch.Tensor) -> None:
        try:
            self._put(h, targets, data)
        finally:
            with self._pending_lock:
                left = [i for i in self.pending.pop(h, []) if i not in targets]
                if left:                     # another write of h, to other tiers, is still queued
                    self.pending[h] = left

    def _put(self, h: int, targets: list[int], data: torch.Tensor) -> None:
        for i in targets:
            tier = self.tiers[i]
            try:
                if tier.put(h, data):
                    tier.written.append(h)
                    tier.stats["puts"] += 1
                    tier.stats["bytes_written"] += data.numel()
            except Exception as e:
                tier.stats["failures"] += 1
                log.warning("KV tier %s write failed: %s", tier.label, e)
