"""The PD router's scoring (pure functions) and the name service's leases on a real etcd."""

import time

import pytest

from baton.backends.cluster.registry import NodeInfo, short_hash
from baton.backends.cluster.router import (
    QUEUED_REQUEST_TOKENS,
    cached_prefix_blocks,
    prefill_cost,
    rank_decode,
    rank_prefill,
    uncached_tokens,
)
from baton.backends.kv.hashing import hash_blocks

PROMPT = list(range(100, 164))                       # 4 blocks of 16


def _hashes(prompt, n):
    return [short_hash(h) for h in hash_blocks(prompt, 16)][:n]


def _p(node_id, hashes=(), waiting=0, running=0):
    return NodeInfo(node_id, "prefill", f"{node_id}:8001", block_size=16, hashes=list(hashes), waiting=waiting,
                    running=running)


def _d(node_id, free, running=0):
    return NodeInfo(node_id, "decode", f"{node_id}:8001", block_size=16, num_blocks=100, free_blocks=free,
                    running=running)


def test_prefix_match_counts_leading_blocks_only():
    h = _hashes(PROMPT, 4)
    assert cached_prefix_blocks(_p("a", h[:3]), h) == 3
    assert cached_prefix_blocks(_p("a", h[1:]), h) == 0          # no first block: nothing usable
    assert uncached_tokens([_p("a", h[:2])], PROMPT) == {"a": 64 - 32}


def test_a_lora_requests_prefix_is_scored_with_the_blocks_the_engine_keys_by_its_adapter():
    from baton.backends.engine.sampling_params import SamplingParams
    from baton.backends.engine.sequence import Sequence

    adapter = [short_hash(h) for h in Sequence(PROMPT, SamplingParams(), 16, lora="sql").block_hashes]
    base, with_sql = _p("base", _hashes(PROMPT, 4)), _p("sql", adapter)
    assert uncached_tokens([base, with_sql], PROMPT, lora="sql") == {"base": 64, "sql": 0}
    assert uncached_tokens([base, with_sql], PROMPT) == {"base": 0, "sql": 64}
    assert [n.node_id for n in rank_prefill([base, with_sql], PROMPT, {}, lora="sql")] == ["sql", "base"]


def test_prefill_goes_where_the_prefix_is_cached_unless_that_node_is_busier_than_the_saving():
    h = _hashes(PROMPT, 4)
    warm, cold = _p("b-warm", h), _p("a-cold")
    assert [n.node_id for n in rank_prefill([cold, warm], PROMPT, {})] == ["b-warm", "a-cold"]
    # 64 cached tokens saved, but 100 tokens already in flight there: the cold node is faster
    assert rank_prefill([cold, warm], PROMPT, {"b-warm": 100})[0].node_id == "a-cold"
    # a request waiting at the node counts QUEUED_REQUEST_TOKENS
    assert QUEUED_REQUEST_TOKENS > 64
    assert rank_prefill([cold, _p("b-warm", h, waiting=1)], PROMPT, {})[0].node_id == "a-cold"


def test_prefill_counts_what_a_node_reports_computing_without_double_counting_our_own():
    h = _hashes(PROMPT, 4)
    busy = _p("a", h)
    busy.queued_tokens = 100                                # another router's long prompt
    assert prefill_cost(busy, 0, 0) == 100
    assert prefill_cost(busy, 0, 80) == 100                 # ours (80) is part of what it reports
    assert prefill_cost(busy, 0, 150) == 150
    busy.waiting = 1
    assert prefill_cost(busy, 10, 0) == 10 + 100 + QUEUED_REQUEST_TOKENS
    busy.waiting = 0
    assert rank_prefill([busy, _p("b")], PROMPT, {})[0].node_id == "b"      # 64 uncached < 100 queued


def test_prefill_ties_go_to_fewer_running_then_rotate():
    nodes = [_p("b"), _p("a"), _p("c")]
    assert [rank_prefill(nodes, PROMPT, {}, turn)[0].node_id for turn in range(4)] == ["a", "b", "c", "a"]
    assert [n.node_id for n in rank_prefill(nodes, PROMPT, {}, 1)] == ["b", "c", "a"]
    assert rank_prefill([_p("a", running=2), _p("b")], PROMPT, {})[0].node_id == "b"


def test_decode_takes_the_most_room_and_skips_nodes_without_headroom():
    # 64 prompt + 100 new tokens = 11 blocks
    nodes = [_d("a", 30), _d("b", 50), _d("c", 10)]
    assert [n.node_id for n in rank_decode(nodes, 164, {})] == ["b", "a", "c"]
    assert [n.node_id for n in rank_decode(nodes, 164, {"b": 45})] == ["a", "c", "b"]   # b: 50 - 45 in flight
    # nobody has room: the most free still comes first (it queues there)
    assert rank_decode([_d("a", 5), _d("b", 8)], 164, {})[0].node_id == "b"
    assert rank_decode([_d("b", 30, running=1), _d("a", 30, running=3)], 164, {})[0].node_id == "b"


def test_decode_nodes_of_another_kv_layout_are_never_chosen():
    a, b, c = _d("a", 90), _d("b", 50), _d("c", 40)
    a.block_bytes, b.block_bytes = 4096, 2048                 # c reports none (an older node): not excluded
    assert [n.node_id for n in rank_decode([a, b, c], 164, {}, block_bytes=2048)] == ["b", "c"]
    assert [n.node_id for n in rank_decode([a, b, c], 164, {})] == ["a", "b", "c"]


def test_leases_expire_and_membership_survives_etcd_going_away():
    from baton.backends.cluster.etcd import EtcdProcess
    from baton.backends.cluster.registry import LEASE_TTL_S, Membership, Registration
    from baton.backends.serving.launcher import free_port

    pytest.importorskip("etcd3gw")
    etcd = EtcdProcess("127.0.0.1", free_port(), free_port()).start()
    try:
        load = {"n": 0}

        def info():
            load["n"] += 1
            return NodeInfo("p0", "prefill", "127.0.0.1:1", running=load["n"])

        reg = Registration(etcd.url, "t", info)
        members = Membership(etcd.url, "t")
        assert [n.node_id for n in members.of_role("prefill")] == ["p0"]
        time.sleep(2.2)
        members.poll()
        assert members.of_role("prefill")[0].running >= 2               # heartbeats carry fresh load
        reg.stopped.set()                                               # a node that stops heartbeating...
        reg.thread.join()
        deadline = time.monotonic() + LEASE_TTL_S + 2
        while members.of_role("prefill") and time.monotonic() < deadline:
            time.sleep(0.2)
            members.poll()
        assert members.of_role("prefill") == []                         # ...is gone within about one TTL
        Registration(etcd.url, "t", info)
        members.poll()
        assert len(members.of_role("prefill")) == 1
        etcd.stop()                                                     # etcd down: the last view stays
        errors = members.errors
        members.poll()
        assert members.errors == errors + 1 and len(members.of_role("prefill")) == 1
        members.stop()
    finally:
        etcd.stop()


def test_prefill_reports_the_requests_and_tokens_it_is_computing(tmp_path):
    import numpy as np

    from baton import SamplingParams
    from baton.backends.stages.messages import PrefillRequest
    from baton.backends.stages.prefill import PrefillStage

    path = tmp_path / "prefill-0.load"
    stage = PrefillStage(None, b"k", load_path=str(path))
    seen = []
    stage._run = lambda batch, t0=0.0: seen.append(np.fromfile(path, dtype=np.int64).tolist()) or []
    stage.run([PrefillRequest("a", [1] * 30, SamplingParams()), PrefillRequest("b", [2] * 12, SamplingParams())])
    assert seen == [[2, 42]]                                            # while it runs: what the node reports
    assert np.fromfile(path, dtype=np.int64).tolist() == [0, 0]         # and nothing once done


def test_a_pd_node_says_what_it_lacks_before_starting_anything(qwen3_dir, tmp_path, monkeypatch):
    from baton.backends.serving.launcher import Node

    monkeypatch.setenv("BATON_RUN_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="needs --name-service"):
        Node(str(qwen3_dir), "pd_decode").start(quiet=True)
    with pytest.raises(RuntimeError, match="--cluster-key-file"):
        Node(str(qwen3_dir), "pd_decode", name_service="http://127.0.0.1:1").start(quiet=True)
    key = tmp_path / "cluster.key"
    key.write_text("ab" * 32)
    with pytest.raises(RuntimeError, match="--name-service http://127.0.0.1:1: etcd does not answer"):
        Node(str(qwen3_dir), "pd_prefill", name_service="http://127.0.0.1:1", cluster_key_file=str(key)).start(quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.key"]          # no run dir, nothing started


def test_lower_tier_blocks_count_by_their_weight_and_the_store_for_every_node():
    h = _hashes(PROMPT, 4)
    pool_only = _p("a", h[:1])
    pool_only.tier_hashes = {"host": h[1:2], "disk": h[2:4]}
    # pool 1 + host 0.8 + disk 0.3 + 0.3 blocks of 16 tokens
    assert cached_prefix_blocks(pool_only, h) == pytest.approx(2.4)
    assert uncached_tokens([pool_only], PROMPT) == {"a": 64 - round(2.4 * 16)}
    assert uncached_tokens([pool_only], PROMPT, {"host": 1.0, "disk": 1.0}) == {"a": 0}
    # a block another node wrote to the cluster's store counts for every node, after its own tiers
    writer, cold = _p("w"), _p("c")
    writer.tier_hashes = {"store": h}
    assert uncached_tokens([writer, cold], PROMPT) == {"w": 64 - 32, "c": 64 - 32}
    # a gap ends the usable prefix, whatever tier has the blocks after it
    gap = _p("g", h[:1])
    gap.tier_hashes = {"host": h[2:]}
    assert cached_prefix_blocks(gap, h) == 1.0
    assert [n.node_id for n in rank_prefill([cold, pool_only], PROMPT, {})] == ["a", "c"]


def test_tier_weights_are_checked():
    from baton.backends.engine.config import ConfigError
    from baton.backends.serving.config import ServingConfig

    assert ServingConfig(tier_weights={"store": 0.7}).tier_weights == {"store": 0.7}
    for bad in ({"ssd": 0.5}, {"host": 1.5}, {"disk": "high"}):
        with pytest.raises(ConfigError, match="tier_weights"):
            ServingConfig(tier_weights=bad)


def test_encode_servers_rank_by_calls_in_flight_then_by_the_image():
    from baton.backends.cluster.encoders import rank_encoders, rendezvous

    a, b, c = (NodeInfo(x, "encode", f"{x}:1") for x in "abc")
    key = "0123456789abcdef0123456789abcdef"
    by_image = sorted([a, b, c], key=lambda n: -rendezvous(n.node_id, key))
    # idle: the image's own order, the same every time and whatever order the membership lists them in
    assert rank_encoders([a, b, c], {}, key) == rank_encoders([c, a, b], {}, key) == by_image
    # another image, another order for some (rendezvous hashing spreads images over the servers)
    firsts = {rank_encoders([a, b, c], {}, f"{i:032x}")[0].node_id for i in range(32)}
    assert firsts == {"a", "b", "c"}
    # busy: fewest calls in flight first, this front's own and those the server reports queued
    best = by_image[0]
    assert rank_encoders([a, b, c], {best.node_id: 1}, key)[-1] is best
    best.waiting = 2
    assert rank_encoders([a, b, c], {}, key)[-1] is best


def test_a_prompt_with_an_image_matches_the_blocks_a_prefill_node_keyed_on_that_image():
    """A node's cached hashes of an image prompt chain through the image's content hash from its
    placeholders' block on; the router computes the same ones from the spans preprocess made, so it
    sees the hit, and sees none past the text before the image for another image."""
    from baton.backends.engine.sampling_params import SamplingParams
    from baton.backends.engine.sequence import Sequence
    from baton.backends.multimodal.prompt import ImageSpan, MultiModalPrompt

    prompt = list(range(100, 100 + 80))                # 5 blocks; placeholders at 20..35 (blocks 1-2)
    image, other = ImageSpan(20, 16, "a" * 32, (1, 8, 8)), ImageSpan(20, 16, "b" * 32, (1, 8, 8))
    seq = Sequence(prompt, SamplingParams(), 16, mm=MultiModalPrompt.of([image], len(prompt), 2))
    node = _p("a", [short_hash(h) for h in seq.block_hashes])
    assert uncached_tokens([node], prompt, images=[image]) == {"a": 0}
    assert uncached_tokens([node], prompt, images=[other]) == {"a": 80 - 16}      # only block 0 is text alone
    assert uncached_tokens([node], prompt) == {"a": 80 - 16}                       # no image keys: no match either


def test_a_call_is_given_up_only_once_its_node_has_been_gone_from_the_name_service_a_while(monkeypatch):
    """A lease that lapsed for a heartbeat (the node registers again at its next) does not end the
    node's calls; a node gone ABSENT_GRACE_S does."""
    from baton.backends.cluster import nodes

    monkeypatch.setattr(nodes, "ABSENT_GRACE_S", 0.2)
    calls = nodes.NodeCalls("http://127.0.0.1:9", "t", 1.0)       # no etcd there: membership set by hand
    try:
        n = NodeInfo("p0", "prefill", "127.0.0.1:1")
        calls.members.nodes = {"p0": n}
        assert calls._member(n)
        calls.members.nodes = {}
        assert calls._member(n)                                      # just gone: still counts
        time.sleep(0.25)
        assert not calls._member(n)
        calls.members.nodes = {"p0": n}                              # registered again
        assert calls._member(n)
        calls.members.nodes = {}
        assert calls._member(n)                                      # the grace starts over
    finally:
        calls.close()
