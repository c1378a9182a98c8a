"""Prefill and decode on separate servers, each on its own simulated host (a network namespace), the
router and etcd on a third: real tritonservers, the Mooncake transfer engine over TCP across veth
interfaces, etcd leases. Outputs are checked token for token against the offline engine."""

import time

import pytest
from conftest import PD_PROMPTS as PROMPTS
from conftest import lora_adapter, pd_cluster, pd_leaks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(qwen3_dir, tmp_path_factory):
    return lora_adapter(qwen3_dir, tmp_path_factory.mktemp("lora") / "sql", 3, r=8, lora_alpha=16,
                        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])


@pytest.fixture(scope="module")
def p1d1(qwen3_dir, tmp_path_factory, adapter):
    c = pd_cluster(qwen3_dir, tmp_path_factory, 1, 1, engine_extra=f'lora_modules = {{sql = "{adapter}"}}')
    yield c
    c.stop()


def test_1p1d_greedy_and_seeded_match_the_offline_engine(p1d1, pd_expected):
    greedy, seeded = pd_expected
    out = p1d1.generate([{"prompt": p, "max_tokens": 20, "temperature": 0.0} for p in PROMPTS], concurrency=2)
    assert [r["error"] for r in out] == [""] * 4
    assert [r["token_ids"] for r in out] == greedy
    out = p1d1.generate([{"prompt": p, "max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 7 + i}
                         for i, p in enumerate(PROMPTS)], concurrency=4)
    assert [r["token_ids"] for r in out] == seeded
    read = p1d1.metric("baton:kv_transfer_blocks_read_total", ["decode0"])["decode0"]
    assert read > 0                      # the KV did cross: decode read blocks from the prefill host
    assert p1d1.metric("baton:kv_transfer_failures_total", ["decode0"])["decode0"] == 0
    assert pd_leaks(p1d1) == {"prefill0": (0, 0), "decode0": (0, 0)}


def test_a_lora_request_runs_its_adapter_on_both_servers(p1d1, qwen3_dir, adapter):
    """The adapter's name crosses to the decode host in the signed KV handle: every token, the first
    (prefill) and the rest (decode), is the offline engine's with that adapter."""
    from baton import LLM, SamplingParams

    llm = LLM(str(qwen3_dir), dtype="float32", kv_cache_memory_mb=16, max_model_len=1024,
              lora_modules={"sql": str(adapter)})
    try:
        tok = llm.engine.tokenizer
        sp = SamplingParams(temperature=0, max_tokens=20)
        expect = [llm.generate(tok.encode(p), sp, lora=name)[0].token_ids for p, name in zip(PROMPTS[:2], ("sql", ""))]
    finally:
        llm.close()
    out = p1d1.generate([{"prompt": p, "max_tokens": 20, "temperature": 0.0, "lora": name}
                         for p, name in zip(PROMPTS[:2], ("sql", ""))], concurrency=2)
    assert [r["error"] for r in out] == ["", ""]
    assert [r["token_ids"] for r in out] == expect
    (bad,) = p1d1.generate([{"prompt": "x", "max_tokens": 2, "lora": "nope"}])
    assert "lora: no LoRA adapter named 'nope'; this server has: sql" in bad["error"]
    assert pd_leaks(p1d1) == {"prefill0": (0, 0), "decode0": (0, 0)}


def test_a_shared_prefix_transfers_only_the_new_blocks(p1d1):
    base = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8
    read = lambda: p1d1.metric("baton:kv_transfer_blocks_read_total", ["decode0"])["decode0"]  # noqa: E731
    reused = lambda: p1d1.metric("baton:kv_transfer_blocks_reused_total", ["decode0"])["decode0"]  # noqa: E731
    (first,) = p1d1.generate([{"prompt": base + "one", "max_tokens": 4}])
    time.sleep(1.5)                      # decode's stats reach its metrics about once a second
    r0, u0 = read(), reused()
    (second,) = p1d1.generate([{"prompt": base + "two, three", "max_tokens": 4}])
    time.sleep(1.5)
    assert second["cached_tokens"] > 0                       # prefill hit its own prefix cache
    new_blocks, reused_blocks = read() - r0, reused() - u0
    full = second["cached_tokens"] // 16
    assert reused_blocks >= full - 1 and reused_blocks > 0    # decode had them: not read again
    assert new_blocks <= 2


def test_no_blocks_leak_after_100_requests_with_cancellations(p1d1):
    reqs = [{"prompt": PROMPTS[i % 4] + str(i), "max_tokens": 30, "temperature": 0.7, "seed": i,
             **({"cancel_after": 2} if i % 3 == 0 else {})} for i in range(100)]
    out = p1d1.generate(reqs, concurrency=6)
    assert [r["error"] for r in out] == [""] * 100
    assert sum(r["finish_reason"] == "cancelled" for r in out) == 34
    assert pd_leaks(p1d1) == {"prefill0": (0, 0), "decode0": (0, 0)}
