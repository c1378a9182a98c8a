"""A KV tier on local files (issue 17's L4, standing in for NVMe): one file per block, named by the
block's chained hash, under a directory per model fingerprint and KV layout, so the same prefix
computed on another node or before a restart is found again, and a block of another model or layout
never is.

A file is a 32-byte header (magic, version, payload length, xxh3-64 of the payload) and the block's
bytes (its K/V span, as kv/pool.py lays it out). Writes go to a temporary name and are renamed into
place, so a reader never sees half a block; a file whose checksum does not match is removed and
reported as a miss. The directory is bounded by `capacity_bytes`, least recently used first out. A
full disk turns writes off (reads go on) until `retry_writes()`.

This is the building block; wiring it into lookups and promotion through the KV connector is not
done yet (issue 17)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
from collections import OrderedDict
from pathlib import Path

import xxhash

log = logging.getLogger("kv-files")

MAGIC = b"BTKV"
VERSION = 1
_HEADER = struct.Struct("<4sIQQQ")           # magic, version, payload bytes, xxh3-64, reserved


def namespace(model_fingerprint: str, layout: str) -> str:
    """The directory name for one model and KV layout (dtype, block size, layers, heads...)."""
    return hashlib.sha256(f"{model_fingerprint}|{layout}".encode()).hexdigest()[:24]


class FileStore:
    def __init__(self, root: str | Path, space: str, capacity_bytes: int) -> None:
        self.dir = Path(root).expanduser() / space
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_bytes
        self.writable = True
        self.stats = {"hits": 0, "misses": 0, "puts": 0, "bytes_written": 0, "bytes_read": 0, "corrupt": 0,
                      "evicted": 0}
        # what is there, oldest use first: rebuilt from the files' times, so a restart keeps its blocks
        files = sorted(self.dir.glob("*/*.kv"), key=lambda p: p.stat().st_mtime)
        self.lru: OrderedDict[int, int] = OrderedDict((int(p.stem, 16), p.stat().st_size) for p in files)
        self.used = sum(self.lru.values())

    def _path(self, key: int) -> Path:
        h = format(key, "032x")
        return self.dir / h[:2] / f"{h}.kv"

    def contains(self, keys: list[int]) -> list[bool]:
        """One batched existence query (memory only: no file is opened)."""
        return [k in self.lru for k in keys]

    def leading(self, keys: list[int]) -> int:
        """How many of `keys`, from the first, are stored (a prefix is only usable from its start)."""
        n = 0
        for k in keys:
            if k not in self.lru:
                break
            n += 1
        return n

    def put(self, key: int, data: bytes | memoryview) -> bool:
        """Store a block (a no-op if it is there). False when writes are off or failed."""
        if key in self.lru:
            self.lru.move_to_end(key)
            return True
        if not self.writable:
            return False
        payload = memoryview(data).cast("B")
        size = _HEADER.size + payload.nbytes
        self._evict(self.capacity - size)
        if size > self.capacity:
            return False
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, payload.nbytes, xxhash.xxh3_64_intdigest(payload), 0))
                f.write(payload)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.writable = False
                log.warning("KV file tier %s: disk full; writes stop, reads go on", self.dir)
                return False
            raise
        self.lru[key] = size
        self.used += size
        self.stats["puts"] += 1
        self.stats["bytes_written"] += payload.nbytes
        return True

    def get(self, key: int, out: memoryview) -> bool:
        """Read a block into `out` (its exact size). False on a miss, or a damaged file (then removed)."""
        if key not in self.lru:
            self.stats["misses"] += 1
            return False
        out = memoryview(out).cast("B")
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                magic, version, nbytes, digest, _ = _HEADER.unpack(f.read(_HEADER.size))
                ok = magic == MAGIC and version == VERSION and nbytes == out.nbytes and f.readinto(out) == nbytes
        except (OSError, struct.error):
            ok = False
        if ok and xxhash.xxh3_64_intdigest(out) == digest:
            self.lru.move_to_end(key)
            os.utime(path)                                   # its use survives a restart too
            self.stats["hits"] += 1
            self.stats["bytes_read"] += nbytes
            return True
        log.warning("KV file tier: %s is damaged; removed", path)
        self.stats["corrupt"] += 1
        self._remove(key)
        return False

    def retry_writes(self) -> None:
        self.writable = True

    def _evict(self, budget: int) -> None:
        while self.lru and self.used > budget:
            self._remove(next(iter(self.lru)))
            self.stats["evicted"] += 1

    def _remove(self, key: int) -> None:
        self.used -= self.lru.pop(key, 0)
        self._path(key).unlink(missing_ok=True)
