"""KV pool in shared memory, block hashing, block manager."""

import subprocess
import sys
import uuid

import pytest
import torch

from baton.backends.kv import BlockManager, KVPool, OutOfBlocks, PoolSpec, block_hash, hash_blocks


def test_pool_is_one_shared_file_another_process_maps_by_name():
    name = f"test-{uuid.uuid4().hex[:8]}"
    spec = PoolSpec(num_blocks=8, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    pool = KVPool.create(name, spec)
    path = KVPool.data_path(name)
    try:
        assert path.stat().st_size == 8 * spec.block_bytes
        k, v = pool.layers[1]
        k[3, 2] = 1.5
        v[7, 0] = -2.0
        code = (
            "import sys; from baton.backends.kv import KVPool; p = KVPool.attach(sys.argv[1]); "
            "k, v = p.layers[1]; print(float(k[3, 2, 0, 0]), float(v[7, 0, 1, 7])); p.layers[0][0][0, 0] = 4.0"
        )
        out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["1.5", "-2.0"]
        assert float(pool.layers[0][0][0, 0, 1, 3]) == 4.0       # the other process's write is visible
        # a block is one contiguous span of the pool (the unit moved between tiers/nodes)
        assert pool.tensor[5].is_contiguous()
    finally:
        pool.close()
    assert not path.exists() and not KVPool.meta_path(name).exists()


def test_attach_unknown_pool_is_clear():
    with pytest.raises(FileNotFoundError, match="no KV pool named"):
        KVPool.attach("does-not-exist")


def test_block_hash_stable_across_processes():
    ids = list(range(40))
    here = hash_blocks(ids, 16, ("lora-1",))
    code = "from baton.backends.kv import hash_blocks; print(hash_blocks(list(range(40)), 16, ('lora-1',)))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert str(here) == there.strip()
    assert len(here) == 2                                   # only full blocks
    assert here[1] == block_hash(here[0], ids[16:32], ("lora-1",))
    assert hash_blocks(ids, 16)[0] != here[0]               # extra keys change the key
    assert hash_blocks([9] + ids[1:], 16)[1] != here[1]     # a change in block 0 changes block 1 (chained)


def test_block_manager_refcounts_lru_and_prefix_reuse():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = bm.allocate(2)
    bm.cache_block(a[0], 111)
    bm.cache_block(a[1], 222)
    assert bm.match_prefix([111, 222, 333]) == a           # shared: refcount 2
    assert bm.ref_counts[a[0]] == 2
    bm.release(a)
    bm.release(a)
    assert bm.num_free == 4
    # freed cached blocks stay findable until reused; untouched blocks are handed out first
    b = bm.allocate(2)
    assert set(b).isdisjoint(a)
    assert bm.match_prefix([111]) == [a[0]]
    bm.release([a[0]])
    with pytest.raises(OutOfBlocks):
        bm.allocate(5)
    c = bm.allocate(2)                                       # evicts the cached ones now
    assert set(c) == set(a)
    assert bm.match_prefix([111]) == []
    with pytest.raises(RuntimeError, match="released more often"):
        bm.release(c + c)


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=2, block_size=16, enable_prefix_caching=False)
    a = bm.allocate(1)
    bm.cache_block(a[0], 5)
    assert bm.match_prefix([5]) == []


def test_pool_dtype_and_views():
    spec = PoolSpec(num_blocks=3, num_layers=4, block_size=2, num_kv_heads=1, head_dim=4, dtype="float32")
    pool = KVPool.create(f"test-{uuid.uuid4().hex[:8]}", spec)
    try:
        assert pool.tensor.dtype == torch.float32 and pool.tensor.shape == spec.shape
        assert len(pool.layers) == 4 and pool.layers[2][1].shape == (3, 2, 1, 4)
    finally:
        pool.close()
