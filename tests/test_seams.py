"""The seams later features plug into, each exercised through a real engine: the model forward
(inputs_embeds, explicit positions, logits for any rows), the attention backend (metadata built once
per step), the KV connector (a sequence's K/V loaded from another engine's pool) and the linear
weight method (the fused decode step is the packed method's fast path)."""

import pytest
import torch
from conftest import prompts_of

from baton import LLM, SamplingParams
from baton.backends.kv.connector import ExternalMatch, HandoffConnector, KVConnector
from baton.kernels import attention
from baton.kernels.attention_backend import StepLayout

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    engine = LLM(qwen3_dir, dtype="float32", num_blocks=64, max_model_len=256)
    yield engine
    engine.close()


def _prefill_step(eng, n, first_block):
    """A StepLayout for one n-token prefill into blocks first_block.. (no prefix)."""
    bs = eng.block_size
    table = list(range(first_block, first_block + -(-n // bs)))
    return StepLayout(prefill_q_lens=[n], prefill_prefix_lens=[0], prefill_tables=[table],
                      slot_blocks=[table[j // bs] for j in range(n)], slot_offsets=[j % bs for j in range(n)])


def test_forward_takes_inputs_embeds_and_returns_logits_for_any_rows(llm, qwen3_dir):
    """Embeddings in place of ids give the same hidden states; logits for chosen rows (in the order
    asked) equal those rows of every-row logits, and every row matches transformers."""
    from transformers import AutoModelForCausalLM

    eng = llm.engine
    model, runner = eng.model, eng.runner
    ids = torch.tensor(prompts_of(512, [21], seed=61)[0])
    pos = torch.arange(len(ids))
    layout = _prefill_step(eng, len(ids), 40)
    h_ids = model.forward(ids, pos, runner.attention.build(layout), eng.pool.layers)
    embeds = torch.nn.functional.embedding(ids, model.embed)
    h_emb = model.forward(None, pos, runner.attention.build(layout), eng.pool.layers, inputs_embeds=embeds)
    assert torch.equal(h_ids, h_emb)
    with pytest.raises(ValueError, match="exactly one"):
        model.forward(ids, pos, runner.attention.build(layout), eng.pool.layers, inputs_embeds=embeds)
    every = model.logits(h_ids)
    some = model.logits(h_ids, torch.tensor([20, 3, 7]))
    torch.testing.assert_close(some, every[[20, 3, 7]], rtol=1e-5, atol=1e-5)   # fp32 GEMMs: not bit-invariant
    hf = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(every, ref, rtol=1e-4, atol=1e-4)


def test_attention_metadata_is_built_once_per_step(qwen3_dir, monkeypatch):
    """Over a multi-layer model and a step mixing decodes and a prefill chunk: one DecodeMeta and one
    PrefillMeta per step, and the torch path's padding mask computed once, not per layer."""
    from baton.kernels import cpu_ext

    monkeypatch.setitem(cpu_ext._state, "ok", False)                 # the torch path builds a mask
    counts = {"decode": 0, "prefill": 0, "mask": 0}
    for cls, key in ((attention.DecodeMeta, "decode"), (attention.PrefillMeta, "prefill")):
        build = cls.build.__func__
        monkeypatch.setattr(cls, "build", classmethod(lambda c, *a, _b=build, _k=key, **k: (
            counts.__setitem__(_k, counts[_k] + 1), _b(c, *a, **k))[1]))
    orig_mask = attention.torch.zeros

    def zeros(*a, **k):
        if len(a) == 4 and a[1:3] == (1, 1):
            counts["mask"] += 1
        return orig_mask(*a, **k)

    monkeypatch.setattr(attention.torch, "zeros", zeros)
    llm = LLM(qwen3_dir, dtype="float32", num_blocks=64, max_num_batched_tokens=24)
    try:
        eng = llm.engine
        assert eng.config.num_layers > 1
        for p in prompts_of(512, [5, 9], seed=62):
            eng.add_request(p, GREEDY)
        eng.step()                                        # both prefills
        eng.add_request(prompts_of(512, [40], seed=63)[0], GREEDY)
        for k in counts:
            counts[k] = 0
        eng.step()                                        # 2 decodes (lengths 6, 10: padded) + a 22-token chunk
        assert counts == {"decode": 1, "prefill": 1, "mask": 1}, counts
    finally:
        llm.close()


class PoolCopyConnector(KVConnector):
    """Loads a sequence's prompt K/V from another engine's pool: the scheduler allocates blocks, the
    copy happens in start_load, and wait() reports it done only on its third call (a slow transfer),
    so the engine must keep the sequence out of its steps until then."""

    def __init__(self, src_pool, handle):
        self.src, self.handle, self.calls, self.waits = src_pool, handle, [], 0

    def matched_external_tokens(self, seq):
        if seq.kv_transfer is None:
            return None
        return ExternalMatch(self.handle.num_computed_tokens)

    def on_allocated(self, seq):
        self.calls.append(("on_allocated", list(seq.block_table)))
        seq.kv_transfer = None

    def start_load(self, seqs):
        (seq,) = seqs
        self.calls.append(("start_load", seq.request_id))
        src = torch.tensor(self.handle.block_table[: len(seq.block_table)])
        self.dst_pool.tensor[torch.tensor(seq.block_table)] = self.src.tensor[src]

    def wait(self, seq):
        self.waits += 1
        return self.waits >= 3

    def on_finished(self, seq, reason):
        self.calls.append(("on_finished", reason))
        return False


def test_kv_connector_loads_prefilled_blocks_from_another_engine(qwen3_dir):
    prompt = prompts_of(512, [37], seed=64)[0]
    expect = None
    producer = LLM(qwen3_dir, dtype="float32", num_blocks=32)
    consumer = LLM(qwen3_dir, dtype="float32", num_blocks=32, enable_prefix_caching=False)
    try:
        expect = producer.generate(prompt, GREEDY)[0].token_ids
        p = producer.engine
        p.connector = p.scheduler.connector = HandoffConnector("producer")
        seq = p.add_request(prompt, GREEDY, prefill_only=True)
        while p.has_unfinished():
            p.step()
        handle = seq.kv_handle
        assert seq.finish_reason == "handoff" and handle.block_table and handle.finish_reason == ""
        assert p.block_manager.num_used == len(handle.block_table)      # kept for the consumer

        c = consumer.engine
        conn = PoolCopyConnector(p.pool, handle)
        conn.dst_pool = c.pool
        c.connector = c.scheduler.connector = conn
        s = c.add_sequence(handle.to_sequence(c.block_size))
        steps = 0
        while c.has_unfinished():
            c.step()
            steps += 1
        assert [t for t in s.output_token_ids] == expect                    # prefill's token + 9 decoded
        assert conn.waits == 3 and steps == 9 + 3          # admitted in one step, two more spent waiting
        assert [k for k, _ in conn.calls] == ["on_allocated", "start_load", "on_finished"]
        assert conn.calls[-1] == ("on_finished", "length") and c.block_manager.num_used == 0
        p.block_manager.release(handle.block_table)
        assert p.block_manager.num_used == 0
    finally:
        producer.close()
        consumer.close()


def test_finished_before_admission_frees_the_handed_over_blocks(qwen3_dir):
    """A hand-off that is aborted while it still waits for admission (decode batch full) returns the
    prefill's blocks: the scheduler adopts them to free them."""
    llm = LLM(qwen3_dir, dtype="float32", num_blocks=32, max_num_seqs=1)
    try:
        eng = llm.engine
        eng.connector = eng.scheduler.connector = HandoffConnector("producer")
        seq = eng.add_request(prompts_of(512, [20], seed=65)[0], GREEDY, prefill_only=True)
        while eng.has_unfinished():
            eng.step()
        handle = seq.kv_handle
        eng.connector = eng.scheduler.connector = HandoffConnector("consumer")
        eng.add_request(prompts_of(512, [8], seed=66)[0], GREEDY)          # takes the one slot
        eng.step()
        waiting = eng.add_sequence(handle.to_sequence(eng.block_size))
        eng.step()
        assert waiting.block_table == [] and eng.block_manager.num_used > len(handle.block_table)
        eng.abort(waiting.request_id)
        while eng.has_unfinished():
            eng.step()
        assert eng.block_manager.num_used == 0
    finally:
        llm.close()


def test_fused_decode_step_is_the_packed_methods_fast_path(qwen3_dir):
    from baton.kernels.linear import LinearMethod, PackedLinearMethod, can_share_packed

    if not can_share_packed(torch.bfloat16):
        pytest.skip("needs oneDNN bf16 and the CPU extension")
    packed = LLM(qwen3_dir, dtype="bfloat16", num_blocks=16)
    plain = LLM(qwen3_dir, dtype="bfloat16", num_blocks=16, pack_weights=False)
    try:
        assert isinstance(packed.engine.model.method, PackedLinearMethod) and packed.engine.model._fused is not None
        assert type(plain.engine.model.method) is LinearMethod and plain.engine.model._fused is None
    finally:
        packed.close()
        plain.close()
