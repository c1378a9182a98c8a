"""Greedy output equals transformers' generate() token for token (fp32, random-init checkpoints)."""

import pytest
import torch
from conftest import FAMILIES, prompts_of

from baton import LLM, SamplingParams

LENGTHS = [5, 17, 33, 70, 1, 48]   # mixed, several longer than a few 16-token blocks
NEW = 24


def hf_greedy(model_dir, prompts, new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request, checkpoint):
    path = checkpoint(request.param, dtype="float32")
    prompts = prompts_of(512, LENGTHS, seed=1)
    return path, prompts, hf_greedy(path, prompts, NEW)


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_greedy_matches_transformers(family_case, impl, monkeypatch):
    from baton.kernels import cpu_ext

    if impl == "torch":
        monkeypatch.setitem(cpu_ext._state, "ok", False)
    path, prompts, expected = family_case
    llm = LLM(path, dtype="float32", num_blocks=64)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    finally:
        llm.close()
    for o, e in zip(outs, expected):
        assert o.token_ids == e
        assert o.finish_reason == "length"


NGRAM = {"method": "ngram", "max_batch": 64, "adaptive": False}     # speculate always


@pytest.mark.parametrize("engine_args", [
    dict(enable_prefix_caching=False),
    dict(enable_chunked_prefill=False),
    dict(max_num_batched_tokens=16),          # prefills split into many chunks, mixed with decodes
    dict(num_blocks=10, max_num_batched_tokens=64),  # forces preemption by recompute
    dict(speculative=NGRAM),                                  # prompt-lookup drafts (mostly rejected here)
    dict(speculative=NGRAM, max_num_batched_tokens=16),       # cut by the budget
    dict(speculative=NGRAM, num_blocks=10, max_num_batched_tokens=64),          # drafts of preempted ones
], ids=["no-prefix-cache", "no-chunked-prefill", "tiny-chunks", "preemption", "spec-ngram", "spec-tiny-chunks",
        "spec-preemption"])
def test_engine_modes_keep_outputs(family_case, engine_args):
    path, prompts, expected = family_case
    args = dict(dtype="float32", num_blocks=64) | engine_args
    llm = LLM(path, **args)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
        if "num_blocks" in engine_args:
            assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.num_used == 0
    finally:
        llm.close()
    assert [o.token_ids for o in outs] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's CUDA path needs a GPU")
@pytest.mark.parametrize("engine_args", [dict(), dict(max_num_batched_tokens=16, num_blocks=12)],
                         ids=["default", "chunks+preemption"])
def test_greedy_matches_transformers_on_cuda(family_case, engine_args):
    """The same checkpoints on the GPU: Triton kernels for attention, norms, RoPE, KV store."""
    path, prompts, expected = family_case
    llm = LLM(path, dtype="float32", device="cuda", **(dict(num_blocks=64) | engine_args))
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    finally:
        llm.close()
    assert [o.token_ids for o in outs] == expected
