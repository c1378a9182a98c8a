"""Prefix caching, sampling, block accounting and input validation on the offline engine."""

import pytest
from conftest import prompts_of

from baton import LLM, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    engine = LLM(qwen3_dir, dtype="float32", num_blocks=128, max_model_len=256)
    yield engine
    engine.close()


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_prefix_hit_reports_cached_tokens_and_same_output(llm):
    shared = prompts_of(512, [70], seed=3)[0]
    a, b = shared + [5, 6, 7], shared + [9, 10]
    first = llm.generate(a, GREEDY)[0]
    second = llm.generate(b, GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64          # 4 full 16-token blocks of the shared 70
    fresh = LLM(llm.engine.model_dir, dtype="float32", num_blocks=64,
                enable_prefix_caching=False)
    try:
        assert fresh.generate(b, GREEDY)[0].token_ids == second.token_ids
    finally:
        fresh.close()
    # the same prompt again: everything but the last block's worth is served from cache
    again = llm.generate(a, GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens == 64


def test_cache_salt_isolates_prefixes(llm):
    p = prompts_of(512, [40], seed=4)[0]
    llm.engine.add_request(p, GREEDY, cache_salt="tenant-a")
    while llm.engine.has_unfinished():
        llm.engine.step()
    other = llm.engine.add_request(p, GREEDY, cache_salt="tenant-b")
    same = llm.engine.add_request(p, GREEDY, cache_salt="tenant-a")
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 32


def test_seeded_sampling_reproducible_and_seed_sensitive(llm):
    p = prompts_of(512, [20], seed=5)[0]

    def run(seed, **kw):
        sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=seed, max_tokens=16, ignore_eos=True, **kw)
        return llm.generate(p, sp)[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(7, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3) == \
        run(7, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3)


def test_seeded_requests_independent_of_batch(llm):
    """A seeded request samples the same tokens alone or batched with others."""
    ps = prompts_of(512, [9, 30, 15], seed=6)
    sp = SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)
    alone = llm.generate(ps[0], sp)[0].token_ids
    batched = llm.generate(ps, [sp, SamplingParams(temperature=1.0, max_tokens=5), GREEDY])[0].token_ids
    assert alone == batched


def test_top_k_1_is_greedy(llm):
    p = prompts_of(512, [25], seed=7)[0]
    greedy = llm.generate(p, GREEDY)[0].token_ids
    topk1 = llm.generate(p, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=12, ignore_eos=True))
    assert topk1[0].token_ids == greedy


def test_repetition_penalty_matches_transformers(llm, qwen3_dir):
    """Greedy with repetition_penalty is token-exact with transformers' (it penalizes prompt and output
    tokens). The prompt holds the model's own greedy continuation, so the penalty on prompt tokens
    already changes the first token (a penalty on output tokens only would not)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = prompts_of(512, [6], seed=3)[0]
    p = p + llm.generate(p, GREEDY)[0].token_ids
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids
    pen = llm.generate(p, SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=24, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          repetition_penalty=1.3, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    assert pen.token_ids == out[0, len(p):].tolist()
    assert pen.token_ids[0] != greedy[0]


def test_stop_tokens_max_tokens_and_logprobs(llm):
    p = prompts_of(512, [12], seed=8)[0]
    base = llm.generate(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True))[0]
    assert len(base.token_ids) == 8 and base.finish_reason == "length"
    assert len(base.logprobs) == 8 and all(lp <= 0 for lp in base.logprobs)
    stop_at = base.token_ids[3]
    cut = llm.generate(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_at]))[0]
    first = base.token_ids.index(stop_at)
    assert cut.token_ids == base.token_ids[: first + 1] and cut.finish_reason == "stop"


def test_eos_stops_unless_ignored(llm):
    eng = llm.engine
    eos = next(iter(eng.eos_token_ids))
    p = prompts_of(512, [10], seed=9)[0]
    base = llm.generate(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    eng.eos_token_ids = {base.token_ids[2]}
    try:
        out = llm.generate(p, SamplingParams(temperature=0, max_tokens=6))[0]
    finally:
        eng.eos_token_ids = {eos}
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: base.token_ids.index(base.token_ids[2]) + 1]


def test_blocks_return_after_finish_and_abort(llm):
    eng = llm.engine
    assert eng.block_manager.num_used == 0
    seqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
            for p in prompts_of(512, [30, 45, 20], seed=10)]
    for _ in range(5):
        eng.step()
    assert eng.block_manager.num_used > 0
    eng.abort(seqs[1].request_id)
    while eng.has_unfinished():
        eng.step()
    assert seqs[1].finish_reason == "abort"
    assert eng.block_manager.num_used == 0
    assert sum(eng.block_manager.ref_counts) == 0


def test_text_prompt_round_trip(llm):
    out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and isinstance(out.text, str)
    assert out.prompt_token_ids == llm.engine.tokenizer.encode("def fibonacci(n):")


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-5), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens="3"), "max_tokens"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(temperature=float("nan")), "temperature"),         # NaN passes every range check
    (dict(top_p=float("nan")), "top_p"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


@pytest.mark.parametrize("prompt, field", [
    ("", "prompt"),
    ([[]], "prompt"),                # one empty token-id prompt
    ([1] * 300, "prompt"),           # longer than max_model_len=256
    ([5, 512], "prompt_token_ids"),  # vocab is 512
    ([5, -1], "prompt_token_ids"),
])
def test_bad_prompts_name_the_field(llm, prompt, field):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(prompt, GREEDY)
    assert e.value.field == field
    assert llm.engine.block_manager.num_used == 0 and not llm.engine.has_unfinished()


def test_unknown_model_directory_and_architecture(tmp_path):
    from baton.backends.models import ModelConfigError

    with pytest.raises(ModelConfigError, match="model directory not found"):
        LLM(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel"):
        LLM(tmp_path)


def test_missing_tensor_is_named(qwen3_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from baton.backends.loader.safetensors_loader import CheckpointError

    for f in qwen3_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    sd = load_file(str(qwen3_dir / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        LLM(tmp_path, dtype="float32", num_blocks=8)


def test_request_larger_than_pool_is_rejected_and_growth_stops_at_capacity(qwen3_dir):
    llm = LLM(qwen3_dir, dtype="float32", num_blocks=4, max_model_len=256)   # 64 tokens of KV
    try:
        with pytest.raises(InvalidRequestError, match="KV blocks"):
            llm.generate(prompts_of(512, [100], seed=12)[0], GREEDY)
        out = llm.generate(prompts_of(512, [40], seed=12)[0],
                           SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 64 - 40 + 1
        assert llm.engine.block_manager.num_used == 0
    finally:
        llm.close()


def test_engine_argument_errors(qwen3_dir):
    with pytest.raises(InvalidRequestError) as e:
        LLM(qwen3_dir, dtype="int3")
    assert e.value.field == "dtype"
    with pytest.raises(InvalidRequestError) as e:
        LLM(qwen3_dir, max_model_len=10**6)
    assert e.value.field == "max_model_len"


def test_stop_strings_cut_the_text_and_stream_without_them(llm):
    from baton.backends.engine.detokenizer import Detokenizer

    eng = llm.engine
    base = llm.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]                                   # a string that does occur in the output
    cut = llm.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                        stop=[stop, "never-there"]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert base.text.startswith(cut.text) and cut.text == base.text[: base.text.index(stop)]
    # streamed deltas concatenate to the same text and never show (part of) the stop string
    seq = eng.add_request("def add(a, b):", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    deltas = []
    while eng.has_unfinished():
        deltas += [o.text for o in eng.step() if o.seq is seq]
    assert "".join(deltas) == cut.text
    # incremental detokenization equals decoding the whole output, for arbitrary UTF-8
    tok = eng.tokenizer
    text = "héllo wörld — ünïcødé ✓ 日本語"
    ids = tok.encode(text)
    d = Detokenizer(tok, [], None)
    pieces = []
    for t in ids:
        d.add([t])
        pieces.append(d.delta())
    assert "".join(pieces) + d.delta(final=True) == tok.decode(ids)


def test_stop_must_be_strings():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(stop=[""])
    assert e.value.field == "stop"


def test_bf16_outputs_do_not_depend_on_caching_chunking_or_batch(checkpoint):
    """bf16 greedy tokens AND their logprobs are bit-identical whether the prompt's prefix comes from
    the cache, the prompt is prefilled in chunks of any size (a 1-token chunk runs as a decode row), or
    the request shares its steps with others: every op computes a row the same way whatever the batch
    (in bf16, a last-bit difference is enough to flip a greedy token a few dozen tokens later)."""
    from baton.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("the torch fallback paths make no batch-invariance promise")
    model = checkpoint("mini-qwen3")
    prompt, *others = prompts_of(512, [121, 40, 77], seed=5)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True)

    def run(prompts: list[list[int]], repeat: int = 1, **kw) -> list:
        llm = LLM(model, max_model_len=256, **kw)
        try:
            for _ in range(repeat):
                outs = llm.generate(prompts, sp)
            return outs
        finally:
            llm.close()

    ref = run([prompt], enable_prefix_caching=False)[0]
    cached = run([prompt], repeat=2)[0]
    assert cached.num_cached_tokens == 112
    variants = {"cached prefix": cached,
                "16-token chunks": run([prompt], enable_prefix_caching=False, max_num_batched_tokens=16)[0],
                "24-token chunks (last is 1)": run([prompt], enable_prefix_caching=False,
                                                   max_num_batched_tokens=24)[0],
                "batched with others": run([others[0], prompt, others[1]], enable_prefix_caching=False)[1]}
    for name, out in variants.items():
        assert (out.token_ids, out.logprobs) == (ref.token_ids, ref.logprobs), name


@pytest.mark.parametrize("preset,quantization,kv", [("mini-qwen3", "", "auto"), ("tiny-qwen2", "", "auto"),
                                                    ("tiny-llama", "", "auto"), ("mini-qwen3", "int8", "auto"),
                                                    ("tiny-qwen2", "int8", "int8"), ("mini-qwen3", "", "fp8")])
def test_fused_decode_step_equals_op_by_op(checkpoint, preset, quantization, kv, monkeypatch):
    """decode_forward_bf16 runs a pure-decode step's whole stack in one C++ call; it must give the same
    tokens and logprobs, bit for bit, as the op-by-op forward (Qwen2's biases, Llama's untied head
    and GQA included), on bf16 and int8 weights, over a bf16, int8 or fp8 KV cache."""
    import torch

    from baton.kernels import cpu_ext

    if not cpu_ext.available():
        pytest.skip("the fused step is part of the C++ extension")
    llm = LLM(checkpoint(preset), max_model_len=256, enable_prefix_caching=False, quantization=quantization,
              kv_cache_dtype=kv)
    try:
        model = llm.engine.model
        if model._fused is None:
            pytest.skip("this CPU's oneDNN layout is not the one linear_packed_bf16 reads")
        prompts = prompts_of(512, [9, 33, 70], seed=7)
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)
        ops, calls = torch.ops.baton_cpu, []
        fused_op = ops.decode_forward_bf16
        monkeypatch.setattr(ops, "decode_forward_bf16", lambda *a: calls.append(1) or fused_op(*a))
        fused = llm.generate(prompts, sp)
        assert len(calls) >= 23                   # every decode step of the batch went through it
        model._fused, n = None, len(calls)
        op_by_op = llm.generate(prompts, sp)
        assert len(calls) == n                    # and this time none did
    finally:
        llm.close()
    assert [(o.token_ids, o.logprobs) for o in fused] == [(o.token_ids, o.logprobs) for o in op_by_op]
