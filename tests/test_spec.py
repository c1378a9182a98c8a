"""Speculative decoding: the prompt-lookup proposer, the lossless verifier, and the engine with
drafts (greedy output identical to the plain engine; seeded sampling independent of the batch; no
unverified token ever published to the prefix index). test_parity also runs the spec engine
against transformers under chunking and preemption."""

import time

import pytest
import torch
from conftest import blocks_in_use

from baton import LLM, SamplingParams
from baton.backends.engine.sequence import Sequence
from baton.backends.spec.proposer import NgramProposer
from baton.backends.spec.verifier import verify

REPEATING = ["def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
             "def fibonacci_memo(n, memo={}):\n    if n < 2:\n        return n\n",
             "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\nfor i in range(",
             "import os\nimport sys\n"]


def test_ngram_proposer_follows_the_latest_match_of_the_longest_suffix():
    prop = NgramProposer(n_max=3, n_min=1)
    seq = Sequence([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], SamplingParams(), 16)
    assert prop.propose([seq], 3) == [[7, 8, 5]]            # "1 2 3" last seen before 7 8 5
    assert prop.propose([Sequence([4, 5, 6], SamplingParams(), 16)], 3) == [[]]
    assert prop.propose([Sequence([5, 6, 5], SamplingParams(), 16)], 4) == [[6, 5]]


def test_verifier_greedy_takes_the_matching_prefix_then_the_targets_token():
    rows = torch.full((4, 8), -10.0)
    for j, t in enumerate([3, 4, 6, 1]):
        rows[j, t] = 5.0
    g = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0)
    assert verify(rows, [3, 4, 5], greedy, lambda j: g) == [3, 4, 6]      # third draft wrong: the target's 6
    assert verify(rows, [3, 4, 6], greedy, lambda j: g) == [3, 4, 6, 1]   # all accepted, plus the bonus token
    assert verify(rows, [0, 4, 6], greedy, lambda j: g) == [3]


def test_verifier_sampling_is_distributed_as_the_target():
    """One-hot drafts of a token p gives 0.3: the first emitted token must still follow p."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6) * 1.5
    p = torch.softmax(logits[0], -1)
    g = torch.Generator().manual_seed(1234)
    params = SamplingParams(temperature=1.0)
    draft = int(torch.argsort(p)[-2])                          # a likely but not the likeliest token
    n = 20000
    counts = torch.zeros(6)
    for _ in range(n):
        counts[verify(logits, [draft], params, lambda j: g)[0]] += 1
    assert torch.allclose(counts / n, p, atol=0.015), (counts / n, p)


def test_the_exponential_race_samples_its_distribution():
    """race(p, gen) draws token i with probability p_i / sum(p) (p unnormalized), as sampling and
    the verifier's bonus token rely on."""
    from baton.backends.engine.sampler import race

    probs = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.1, 0.2]) * 3          # unnormalized, one zero
    g = torch.Generator().manual_seed(7)
    n = 20000
    counts = torch.bincount(torch.tensor([race(probs, g) for _ in range(n)]), minlength=6).float()
    assert counts[2] == 0
    assert torch.allclose(counts / n, probs / probs.sum(), atol=0.015), counts / n


def _llm(qwen3_dir, method=None, k=4, **kw):
    if method:       # speculate in batches too (the default: alone only)
        kw["speculative_config"] = {"method": method, "num_speculative_tokens": k, "max_batch": 64,
                                    "adaptive": False, **kw.pop("spec", {})}
    return LLM(qwen3_dir, dtype="float32", num_blocks=128, max_model_len=512, **kw)


def test_greedy_with_drafts_is_token_exact_and_accepts_drafts(qwen3_dir):
    sp = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True, logprobs=True)
    base = _llm(qwen3_dir)
    spec = _llm(qwen3_dir, "ngram", k=5)
    try:
        a, b = base.generate(REPEATING, sp), spec.generate(REPEATING, sp)
        stats = spec.engine.spec_stats
        assert stats["accepted"] > 0 and stats["drafted"] > stats["accepted"]
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids and x.text == y.text and x.finish_reason == y.finish_reason
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)
        # stop strings and max_tokens end a multi-token step exactly where the plain engine ends
        for params in (SamplingParams(temperature=0.0, max_tokens=37), SamplingParams(temperature=0.0, stop=["(n"])):
            assert [o.token_ids for o in base.generate(REPEATING, params)] == \
                   [o.token_ids for o in spec.generate(REPEATING, params)]
        assert spec.engine.block_manager.num_used == 0
    finally:
        base.close()
        spec.close()


def test_a_seeded_request_samples_the_same_tokens_whatever_its_batch(qwen3_dir):
    spec = _llm(qwen3_dir, "ngram")
    try:
        sp = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48, seed=7, ignore_eos=True)
        alone = spec.generate(REPEATING[1], sp)[0].token_ids
        others = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
        batched = spec.generate([REPEATING[0], REPEATING[1], REPEATING[2]], [others, sp, others])[1].token_ids
        assert alone == batched
    finally:
        spec.close()


def test_no_unverified_token_is_ever_published(qwen3_dir):
    """Every block the spec engine puts in the prefix index holds only tokens of the final output."""
    spec = _llm(qwen3_dir, "ngram", k=6, block_size=4)
    published = []
    bm = spec.engine.block_manager
    real = bm.cache_block
    bm.cache_block = lambda block, h: (published.append(h), real(block, h))[1]
    try:
        outs = spec.generate(REPEATING, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
        final = set()
        for o in outs:
            final |= set(Sequence(o.prompt_token_ids + o.token_ids, SamplingParams(), 4).block_hashes)
        assert published and set(published) <= final
        assert spec.engine.spec_stats["drafted"] > spec.engine.spec_stats["accepted"]   # rejections happened
    finally:
        spec.close()


@pytest.mark.slow
def test_a_node_with_ngram_speculation_streams_the_plain_engines_tokens(qwen3_dir):
    from baton.backends.serving.launcher import Node
    from baton_client import BatonClient

    plain = _llm(qwen3_dir)
    expect = [o.token_ids for o in plain.generate(REPEATING, SamplingParams(temperature=0.0, max_tokens=40,
                                                                           ignore_eos=True))]
    plain.close()
    n = Node(str(qwen3_dir), overrides={"dtype": "float32", "max_model_len": 512, "kv_cache_memory_mb": 8,
                                        "speculative": {"method": "ngram"}})
    n.start(timeout=180, quiet=True)
    try:
        client = BatonClient(n.grpc_url)
        for prompt, e in zip(REPEATING, expect):
            chunks = list(client.stream(prompt, temperature=0.0, max_tokens=40, ignore_eos=True))
            assert [t for c in chunks for t in c.token_ids] == e
        assert blocks_in_use(n.manager.address) == 0
        from test_serving import _metrics

        deadline = time.monotonic() + 10           # decode sends its counters when it goes idle
        while not (m := _metrics(n)).get("baton:spec_accepted_tokens_total") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert 0 < m["baton:spec_accepted_tokens_total"] < m["baton:spec_draft_tokens_total"]
    finally:
        n.stop()
