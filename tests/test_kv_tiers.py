"""KV tiers below the pool (kv/tiers.py, kv/tier_connector.py) in the offline engine, with the real
stores: host memory, local files, Redis (redis-server) and Mooncake Store (mooncake_master).

Each test forces its tier: a pool (L1) too small to keep the first pass's prefixes, and only that
tier configured, so the second pass's prefixes can only come from it. Outputs must equal an engine
without tiers, token for token."""

from __future__ import annotations

import shutil

import pytest

from baton.backends.engine.config import ConfigError
from baton.backends.engine.llm import LLM
from baton.backends.engine.sampling_params import SamplingParams
from baton.backends.kv.tiers import TIER_NAMES, TiersConfig

from conftest import prompts_of

GREEDY = SamplingParams(max_tokens=8, temperature=0)
SMALL_POOL = dict(num_blocks=20, max_num_seqs=1)      # 4 prompts of ~7 blocks: each evicts the previous


@pytest.fixture(scope="module")
def prompts():
    return prompts_of(500, [100, 90, 120, 80], seed=3)


@pytest.fixture(scope="module")
def expected(qwen3_dir, prompts):
    llm = LLM(qwen3_dir, num_blocks=64)
    out = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    llm.close()
    return out


def two_passes(llm: LLM, prompts: list[list[int]]):
    first = llm.generate(prompts, GREEDY)
    llm.engine.tiers.flush()                  # write-through copies are asynchronous
    second = llm.generate(prompts, GREEDY)
    llm.engine.tiers.flush()
    return first, second


def check_from_tier(llm: LLM, prompts, expected, tier: str) -> None:
    first, second = two_passes(llm, prompts)
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    i = TIER_NAMES.index(tier)
    for p, o in zip(prompts, second):           # every prompt's whole prefix comes back, from somewhere
        assert sum(o.cached_by_tier) == o.num_cached_tokens == (len(p) - 1) // 16 * 16
    # and mostly from this tier (the pool keeps the newest blocks, so a later prompt may hit there)
    assert sum(o.cached_by_tier[i] for o in second) >= sum(o.num_cached_tokens for o in second) // 2
    assert llm.engine.block_manager.num_used == 0          # no block leaked (pins included)


def test_host_tier_token_exact(qwen3_dir, prompts, expected):
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"host_mb": 16})
    try:
        check_from_tier(llm, prompts, expected, "host")
        s = llm.engine.tiers.stats()["host"]
        assert s["hits"] > 0 and s["bytes_read"] > 0 and s["used_bytes"] > 0
    finally:
        llm.close()


def test_file_tier_token_exact_and_persists_across_restart(qwen3_dir, prompts, expected, tmp_path):
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"disk_dir": str(tmp_path)})
    try:
        check_from_tier(llm, prompts, expected, "disk")
    finally:
        llm.close()
    # a new engine (a restarted node) finds the files: its very first pass is served from them
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"disk_dir": str(tmp_path)})
    try:
        out = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in out] == expected
        assert all(o.cached_by_tier[TIER_NAMES.index("disk")] > 0 for o in out)
    finally:
        llm.close()


def test_file_tier_is_per_model(qwen3_dir, checkpoint, prompts, tmp_path):
    """Another checkpoint (same shapes, other weights) never sees the first one's blocks."""
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"disk_dir": str(tmp_path)})
    try:
        two_passes(llm, prompts[:1])
    finally:
        llm.close()
    other = checkpoint("tiny-qwen3", dtype="float32", seed=7)
    llm = LLM(other, **SMALL_POOL, kv_tiers={"disk_dir": str(tmp_path)})
    try:
        out = llm.generate(prompts[:1], GREEDY)
        assert out[0].num_cached_tokens == 0
    finally:
        llm.close()


def test_corrupt_file_is_ignored_and_removed(qwen3_dir, prompts, expected, tmp_path):
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"disk_dir": str(tmp_path)})
    try:
        two_passes(llm, prompts)
        files = sorted(tmp_path.glob("*/*/*.kv"))
        assert files
        for f in files:                          # flip a byte of every block's payload
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF
            f.write_bytes(bytes(data))
        out = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in out] == expected
        assert all(o.cached_by_tier[TIER_NAMES.index("disk")] == 0 for o in out)
        llm.engine.tiers.flush()
        s = llm.engine.tiers.stats()["disk"]
        assert s["failures"] > 0
        assert llm.engine.block_manager.num_used == 0
        assert not any(f.read_bytes() == b"" for f in tmp_path.glob("*/*/*.kv"))   # rewritten whole, or gone
    finally:
        llm.close()


def test_write_after_n_hits(qwen3_dir, prompts, tmp_path):
    """hits:2: a block reaches the tier only once the pool has served it twice."""
    llm = LLM(qwen3_dir, num_blocks=64, kv_tiers={"disk_dir": str(tmp_path), "disk_write": "hits:2"})
    try:
        p = prompts[:1]
        llm.generate(p, GREEDY)
        llm.engine.tiers.flush()
        assert not list(tmp_path.glob("*/*/*.kv"))
        llm.generate(p, GREEDY)              # hit 1
        llm.engine.tiers.flush()
        assert not list(tmp_path.glob("*/*/*.kv"))
        llm.generate(p, GREEDY)              # hit 2: written
        llm.engine.tiers.flush()
        assert len(list(tmp_path.glob("*/*/*.kv"))) == (len(p[0]) - 1) // 16
    finally:
        llm.close()


@pytest.fixture
def redis_server():
    from baton.backends.kv.services import RedisServer

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make sysdeps installs it)")
    with RedisServer().start() as r:
        yield r


def test_redis_tier_token_exact(qwen3_dir, prompts, expected, redis_server):
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"redis": redis_server.address})
    try:
        check_from_tier(llm, prompts, expected, "disk")
        assert llm.engine.tiers.stats()["disk"]["label"].startswith("redis")
    finally:
        llm.close()


@pytest.fixture
def mooncake_master():
    from baton.backends.kv.services import MooncakeMaster

    with MooncakeMaster().start() as m:
        yield m


def test_store_tier_token_exact_and_survives_a_dead_master(qwen3_dir, prompts, expected, mooncake_master, caplog):
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"store": mooncake_master.address, "store_mb": 64})
    try:
        check_from_tier(llm, prompts, expected, "store")
        mooncake_master.stop()               # L3 gone: requests go on without it
        with caplog.at_level("WARNING", logger="kv-tiers"):
            out = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in out] == expected
        assert "switched off" in caplog.text
        llm.engine.tiers.flush()
        assert llm.engine.block_manager.num_used == 0
    finally:
        llm.close()


def test_cancel_while_loading_leaks_nothing(qwen3_dir, prompts, tmp_path):
    llm = LLM(qwen3_dir, **SMALL_POOL, kv_tiers={"disk_dir": str(tmp_path)})
    try:
        two_passes(llm, prompts)
        eng = llm.engine
        seq = eng.add_request(prompts[0], GREEDY)
        eng.step()                            # admitted: its blocks are loading
        assert seq.loading or seq.num_computed_tokens
        eng.abort(seq.request_id)
        eng.tiers.flush()
        assert eng.block_manager.num_used == 0
        assert llm.generate(prompts[:1], GREEDY)[0].token_ids
    finally:
        llm.close()


@pytest.mark.parametrize("table, field", [
    ({"host_mb": -1}, "host_mb"), ({"disk_write": "sometimes"}, "disk_write"), ({"hots_mb": 4}, "hots_mb"),
    ({"disk_dir": "/tmp/x", "redis": "127.0.0.1:1"}, "choose one"), ({"host_write": "hits:0"}, "host_write"),
])
def test_bad_tier_config_names_the_field(table, field):
    with pytest.raises(ConfigError, match=field):
        TiersConfig.from_table(table)
