"""KV cache: the shared pool, block hashing and the block manager."""

from .block_manager import BlockManager, OutOfBlocks
from .hashing import block_hash, hash_blocks
from .pool import KVPool, PoolSpec

__all__ = ["BlockManager", "KVPool", "OutOfBlocks", "PoolSpec", "block_hash", "hash_blocks"]
