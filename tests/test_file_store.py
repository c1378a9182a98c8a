"""The local-file KV tier on its own: blocks round-trip bit for bit, survive a restart, a damaged
file is a miss (and removed), capacity evicts least recently used, a full disk stops writes only."""

import errno

import torch

from baton.backends.kv.file_store import FileStore, namespace
from baton.backends.kv.hashing import hash_blocks

BLOCK = 2 * 16 * 2 * 64            # a small block's elements (layers x K/V x tokens x heads x dim)


def _block(seed):
    return torch.randn(BLOCK, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _keys(n):
    return hash_blocks(list(range(16 * n)), 16)


def _get(store, key):
    out = torch.empty(BLOCK, dtype=torch.bfloat16)
    return out if store.get(key, out.view(torch.uint8).numpy()) else None


def test_blocks_round_trip_and_survive_a_restart(tmp_path):
    space = namespace("baton-tiny@abc", "bf16/16/2x2x16x64")
    store = FileStore(tmp_path, space, 1 << 20)
    keys = _keys(3)
    for i, k in enumerate(keys):
        assert store.put(k, _block(i).view(torch.uint8).numpy())
    assert store.contains(keys + [123]) == [True, True, True, False]
    again = FileStore(tmp_path, space, 1 << 20)                   # a restarted node
    assert again.leading(keys + [123]) == 3
    assert all(torch.equal(_get(again, k), _block(i)) for i, k in enumerate(keys))
    assert _get(again, 123) is None and again.stats["hits"] == 3 and again.stats["misses"] == 1
    other = FileStore(tmp_path, namespace("baton-tiny@abc", "fp8/16/2x2x16x64"), 1 << 20)   # another layout
    assert other.leading(keys) == 0


def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path):
    store = FileStore(tmp_path, "s", 1 << 20)
    k = _keys(1)[0]
    store.put(k, _block(0).view(torch.uint8).numpy())
    path = store._path(k)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF                                              # one flipped byte in the payload
    path.write_bytes(bytes(raw))
    assert _get(store, k) is None and store.stats["corrupt"] == 1
    assert not path.exists() and store.contains([k]) == [False]


def test_capacity_evicts_the_least_recently_used(tmp_path):
    one = 32 + BLOCK * 2
    store = FileStore(tmp_path, "s", 3 * one)
    a, b, c, d = _keys(4)
    for i, k in enumerate((a, b, c)):
        store.put(k, _block(i).view(torch.uint8).numpy())
    assert _get(store, a) is not None                             # a used again: b is now the oldest
    store.put(d, _block(3).view(torch.uint8).numpy())
    assert store.contains([a, b, c, d]) == [True, False, True, True]
    assert store.used <= 3 * one and store.stats["evicted"] == 1 and not store._path(b).exists()


def test_a_full_disk_stops_writes_not_reads(tmp_path, monkeypatch):
    import os

    store = FileStore(tmp_path, "s", 1 << 20)
    a, b = _keys(2)
    store.put(a, _block(0).view(torch.uint8).numpy())
    real_replace = os.replace

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert not store.put(b, _block(1).view(torch.uint8).numpy()) and not store.writable
    assert not list(store.dir.glob("*/*.tmp*"))                   # no half-written file left
    assert torch.equal(_get(store, a), _block(0))                 # reads go on
    monkeypatch.setattr(os, "replace", real_replace)
    store.retry_writes()
    assert store.put(b, _block(1).view(torch.uint8).numpy())


def test_a_block_bigger_than_the_tier_is_refused(tmp_path):
    store = FileStore(tmp_path, "s", 100)
    assert not store.put(_keys(1)[0], _block(0).view(torch.uint8).numpy())
    assert store.used == 0 and not list(store.dir.glob("*/*"))
