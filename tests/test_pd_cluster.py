"""Two prefill and two decode nodes, each on its own simulated host: outputs token-exact, requests
spread by load, a shared prefix routed to the node that holds it, and the faults a cluster must
survive (a decode node killed, a prefill node killed, etcd gone)."""

import threading
import time

import pytest
from conftest import PD_PROMPTS as PROMPTS
from conftest import pd_cluster, pd_leaks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def p2d2(qwen3_dir, tmp_path_factory):
    c = pd_cluster(qwen3_dir, tmp_path_factory, 2, 2)
    yield c
    c.stop()


def _count(cluster, name, nodes):
    return cluster.metric(name, nodes)


def test_2p2d_matches_the_offline_engine_and_uses_every_node(p2d2, pd_expected):
    greedy, seeded = pd_expected
    out = p2d2.generate([{"prompt": p, "max_tokens": 20, "temperature": 0.0} for p in PROMPTS * 2], concurrency=4)
    assert [r["error"] for r in out] == [""] * 8
    assert [r["token_ids"] for r in out] == greedy * 2
    out = p2d2.generate([{"prompt": p, "max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 7 + i}
                         for i, p in enumerate(PROMPTS)], concurrency=4)
    assert [r["token_ids"] for r in out] == seeded
    time.sleep(1.5)                   # decode's counters reach its metrics about once a second
    prefills = _count(p2d2, "baton:prefill_requests_total", ["prefill0", "prefill1"])
    decodes = _count(p2d2, "baton:kv_transfer_blocks_read_total", ["decode0", "decode1"])
    assert all(v > 0 for v in prefills.values()), prefills     # in-flight work spreads concurrent requests
    assert all(v > 0 for v in decodes.values()), decodes
    assert all(v == (0, 0) for v in pd_leaks(p2d2).values())


def test_a_shared_prefix_goes_to_the_prefill_node_that_holds_it(p2d2):
    base = "A long shared system prompt that many requests begin with. " * 10
    p2d2.generate([{"prompt": base + "first", "max_tokens": 2}])
    time.sleep(3.5)                   # heartbeats (1 s) carry the new block hashes; the router polls (0.5 s)
    before = _count(p2d2, "baton:cached_prompt_tokens_total", ["prefill0", "prefill1"])
    out = p2d2.generate([{"prompt": base + f"question {i}", "max_tokens": 2} for i in range(4)])
    after = _count(p2d2, "baton:cached_prompt_tokens_total", ["prefill0", "prefill1"])
    assert all(r["cached_tokens"] >= 256 for r in out), [r["cached_tokens"] for r in out]
    gained = sorted(after[n] - before[n] for n in after)
    assert gained[0] == 0 and gained[1] == sum(r["cached_tokens"] for r in out)    # all on one node


def _stream_in_background(cluster, requests, concurrency):
    out = {}

    def run():
        out["results"] = cluster.generate(requests, concurrency)
    t = threading.Thread(target=run)
    t.start()
    return t, out


def _streaming_on_decode1(cluster):
    """Long streams in the background, once decode1 is streaming some of them."""
    long = [{"prompt": p, "max_tokens": 900, "temperature": 0.0, "ignore_eos": True} for p in PROMPTS]
    held = cluster.kv_stats("decode1")["num_used"]       # blocks an earlier test's prompts left cached
    t, out = _stream_in_background(cluster, long, 4)
    deadline = time.monotonic() + 60
    while cluster.kv_stats("decode1")["num_used"] <= held:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.02)
    return t, out


def _tree(pid):
    """pid and every process under it."""
    from pathlib import Path

    children = {}
    for d in Path("/proc").iterdir():
        try:
            children.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
        except (ValueError, OSError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def test_a_frozen_decode_node_ends_its_streams_once_its_lease_ends(p2d2):
    """A decode node that freezes mid-stream (every process stopped: no tokens, no heartbeats): its
    streams end with an error once its key leaves the name service, not at request_timeout_s (600 s);
    the other node's streams finish; resumed, the node registers again and serves."""
    import os
    import signal

    t, out = _streaming_on_decode1(p2d2)
    frozen = _tree(p2d2.nodes["decode1"].proc.pid)
    frozen_at = time.time()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        t.join(120)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert not t.is_alive()
    res = out["results"]
    failed = [r for r in res if r["error"]]
    assert failed and all("given up" in r["error"] and r["t_end"] - frozen_at < 20 for r in failed), \
        [(r["error"][:120], r["t_end"] - frozen_at, r["finish_reason"], len(r["token_ids"])) for r in res]
    assert all(r["finish_reason"] == "length" for r in res if r not in failed)
    reads = _count(p2d2, "baton:kv_transfer_blocks_read_total", ["decode1"])["decode1"]
    deadline = time.monotonic() + 60                      # back in the name service, and served
    while _count(p2d2, "baton:kv_transfer_blocks_read_total", ["decode1"])["decode1"] == reads:
        assert time.monotonic() < deadline, "decode1 serves no request after it resumed"
        after = p2d2.generate([{"prompt": p, "max_tokens": 8} for p in PROMPTS], concurrency=4)
        assert [r["error"] for r in after] == [""] * 4
        time.sleep(1.5)                                   # decode's counters reach its metrics about once a second


def test_a_killed_decode_node_ends_its_streams_quickly_and_is_avoided(p2d2):
    t, out = _streaming_on_decode1(p2d2)
    killed_at = time.time()
    p2d2.kill("decode1")
    t.join(120)
    res = out["results"]
    failed = [r for r in res if r["error"]]
    assert failed and all(r["t_end"] - killed_at < 2.0 for r in failed), [(r["error"], r["t_end"] - killed_at) for r in res]
    assert all(not r["error"] and r["finish_reason"] == "length" for r in res if r not in failed), [(r["error"][:80], len(r["token_ids"]), r["finish_reason"]) for r in res]
    after = p2d2.generate([{"prompt": p, "max_tokens": 8} for p in PROMPTS], concurrency=4)
    assert [r["error"] for r in after] == [""] * 4                  # no request routed to the dead node


def test_a_killed_prefill_node_is_retried_elsewhere(p2d2):
    p2d2.kill("prefill1")
    out = p2d2.generate([{"prompt": p + str(i), "max_tokens": 8} for i, p in enumerate(PROMPTS * 2)], concurrency=4)
    assert [r["error"] for r in out] == [""] * 8


def test_routing_goes_on_while_etcd_is_down(p2d2):
    p2d2.etcd.stop()
    time.sleep(1.0)
    out = p2d2.generate([{"prompt": p, "max_tokens": 8} for p in PROMPTS], concurrency=2)
    assert [r["error"] for r in out] == [""] * 4
    m = p2d2.metric("baton:name_service_errors_total", ["router"])["router"]
    up = p2d2.metric("baton:name_service_up", ["router"])["router"]
    assert m > 0 and up == 0
    assert "unreachable" in p2d2.router.log.read_text()
