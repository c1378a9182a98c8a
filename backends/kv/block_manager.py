"""Block allocation, reference counts and the prefix index of one KV pool.

Free blocks sit in an LRU queue. A freed block keeps its hash and stays findable in the prefix
index until it is reused for new data, so a later request with the same prefix revives it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                     # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hits = 0
        self.queries = 0
        # the KV tiers' write policies (kv/tiers.py): a cached block about to be overwritten, a hit
        self.on_evict: Callable[[int, int], None] | None = None
        self.on_hit: Callable[[int, int], None] | None = None
        self.on_cache: Callable[[int, int], None] | None = None

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)            # least recently freed first
            h = self.block_hash[b]
            if h is not None:                                 # evict its cached content
                if self.cached.get(h) == b:
                    del self.cached[h]
                    if self.on_evict is not None:
                        self.on_evict(b, h)
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference per block; tail blocks are queued first so prefixes outlive suffixes."""
        for b in reversed(blocks):
            rc = self.ref_counts[b] - 1
            if rc < 0:
                raise RuntimeError(f"block {b} released more often than allocated")
            self.ref_counts[b] = rc
            if rc == 0:
                self.free[b] = None

    def match_prefix(self, hashes: list[int]) -> list[int]:
        """Take a reference on the longest run of cached blocks matching `hashes` from the start."""
        if not self.enable_prefix_caching:
            return []
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
            out.append(b)
            if self.on_hit is not None:
                self.on_hit(b, h)
        self.queries += len(hashes)
        self.hits += len(out)
        return out

    def flush(self, idle: bool = False) -> None:
        """Nothing is buffered locally (the remote client's flush sends its batch)."""

    def cache_block(self, block: int, h: int) -> None:
        """Publish a full, computed block under its chained hash (first writer wins)."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        if h not in self.cached:
            self.cached[h] = block
            self.block_hash[block] = h
            if self.on_cache is not None:
                self.on_cache(block, h)
