"""Chained block hashes: hash(parent, block token ids, extra keys).

Seeded xxh3-128 over a fixed byte encoding, so every process, restart and machine computes the
same key for the same prefix (Python's hash() is salted per process and cannot be used)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import xxhash

SEED = 0x6261746F6E  # "baton"
ROOT = 0


def block_hash(parent: int, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    h = xxhash.xxh3_128(seed=SEED)
    h.update(parent.to_bytes(16, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.intdigest()


def hash_blocks(token_ids: Sequence[int], block_size: int, extra_keys: tuple = (),
                parent: int = ROOT, start: int = 0,
                keys_for: Callable[[int, int], tuple] | None = None) -> list[int]:
    """Hashes of the full blocks of token_ids[start:], chained from `parent`. keys_for(start, end):
    a block's own extra keys (a multimodal prompt: the images with a placeholder in it)."""
    out = []
    for i in range(start, len(token_ids) - block_size + 1, block_size):
        keys = extra_keys + keys_for(i, i + block_size) if keys_for is not None else extra_keys
        parent = block_hash(parent, token_ids[i:i + block_size], keys)
        out.append(parent)
    return out


def lora_keys(lora: str) -> tuple:
    """A LoRA adapter's extra keys: its K/V differs from the base model's (and from other adapters')."""
    return (("lora", lora),) if lora else ()
