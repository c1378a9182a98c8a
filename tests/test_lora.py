"""LoRA adapters (PEFT's format): token-exact with transformers + peft, several adapters and the base
model in one batch, their K/V cached apart, bad adapters and unknown names refused by name."""

import json

import pytest
import torch
from conftest import lora_adapter, prompts_of

from baton.backends.engine.errors import InvalidRequestError
from baton.backends.engine.llm import LLM
from baton.backends.engine.sampling_params import SamplingParams
from baton.backends.models.lora import LoRAError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(qwen3_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "all": lora_adapter(qwen3_dir, root / "all", 1, r=4, lora_alpha=8, target_modules=ALL),
        # some projections only (q and v of the fused q|k|v; up of gate|up), rsLoRA's scale
        "some": lora_adapter(qwen3_dir, root / "some", 2, r=8, lora_alpha=16, use_rslora=True,
                         target_modules=["q_proj", "v_proj", "up_proj"]),
    }


@pytest.fixture(scope="module")
def llm(qwen3_dir, adapters):
    llm = LLM(qwen3_dir, dtype="float32", max_model_len=256, kv_cache_memory_mb=8,
              lora_modules={k: str(v) for k, v in adapters.items()})
    yield llm
    llm.close()


def _hf_greedy(base_dir, adapter_dir, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.inference_mode():
        out = model.eval().generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_adapters_and_the_base_model_in_one_batch_match_transformers_with_peft(llm, qwen3_dir, adapters):
    prompts = prompts_of(512, [9, 23, 40, 17], seed=11)
    names = ["all", "some", "", "all"]
    outs = llm.generate(prompts, GREEDY, lora=names)
    for p, name, out in zip(prompts, names, outs):
        assert out.token_ids == _hf_greedy(qwen3_dir, adapters[name] if name else None, p, 12), name
    base = llm.generate(prompts[0], GREEDY)[0].token_ids
    assert outs[0].token_ids != base                # the adapter changes the tokens (the test could fail)
    # each adapter alone gives what it gave batched with the others
    assert llm.generate(prompts[1], GREEDY, lora="some")[0].token_ids == outs[1].token_ids


def test_an_adapters_kv_is_cached_apart_from_the_base_models(llm):
    p = prompts_of(512, [70], seed=12)[0]
    first = llm.generate(p, GREEDY, lora="all")[0]
    assert llm.generate(p, GREEDY)[0].num_cached_tokens == 0         # the base model: none of the adapter's
    assert llm.generate(p, GREEDY, lora="some")[0].num_cached_tokens == 0
    again = llm.generate(p, GREEDY, lora="all")[0]
    assert again.num_cached_tokens == 64 and again.token_ids == first.token_ids


def test_the_fused_decode_step_and_the_lora_path_agree_in_bf16(qwen3_dir, adapters):
    """bf16 decode of base requests runs the one-call C++ step; a batch with an adapter's request runs
    op by op. The base request's tokens must not depend on which (nor the adapter's on its company)."""
    llm = LLM(qwen3_dir, dtype="bfloat16", max_model_len=256, kv_cache_memory_mb=8, enable_prefix_caching=False,
              lora_modules={"all": str(adapters["all"])})
    try:
        a, b = prompts_of(512, [15, 21], seed=13)
        alone = [llm.generate(a, GREEDY)[0].token_ids, llm.generate(b, GREEDY, lora="all")[0].token_ids]
        together = [o.token_ids for o in llm.generate([a, b], GREEDY, lora=["", "all"])]
        assert together == alone
    finally:
        llm.close()


def test_speculative_decoding_verifies_with_the_requestslora_adapter(qwen3_dir, adapters, llm):
    """Drafts (prompt lookup here; any proposer's) are scored by the target with the request's adapter:
    the tokens are those of plain decoding with it."""
    p = prompts_of(512, [12], seed=14)[0]
    p = p + llm.generate(p, GREEDY, lora="all")[0].token_ids + p    # prompt lookup drafts the continuation
    plain = llm.generate(p, GREEDY, lora="all")[0].token_ids
    spec = LLM(qwen3_dir, dtype="float32", max_model_len=256, kv_cache_memory_mb=8,
               lora_modules={"all": str(adapters["all"])},
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    try:
        spec.generate(p[:12], GREEDY, lora="all")        # the governor's first request measures, drafts none
        out = spec.generate(p, GREEDY, lora="all")[0]
    finally:
        spec.close()
    assert out.token_ids == plain and out.num_draft_tokens > 0


def test_an_unknown_adapter_name_is_refused_naming_the_field(llm):
    with pytest.raises(InvalidRequestError, match="lora.*no LoRA adapter named 'nope'; this server has: all, some"):
        llm.generate([1, 2, 3], GREEDY, lora="nope")
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
])
def test_an_adapter_baton_cannot_apply_is_refused_at_load(qwen3_dir, adapters, tmp_path, change, message):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(adapters["all"], d)
    conf = json.loads((d / "adapter_config.json").read_text()) | change
    (d / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(LoRAError, match=f"LoRA adapter 'bad': {message}"):
        LLM(qwen3_dir, dtype="float32", max_model_len=64, kv_cache_memory_mb=4, lora_modules={"bad": str(d)})


def test_an_adapter_of_other_shapes_is_refused_naming_the_projection(qwen3_dir, adapters, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "other"
    shutil.copytree(adapters["all"], d)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.1.self_attn.o_proj.lora_A" in k)
    tensors[key] = torch.zeros(4, 8)                 # another model's width
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match=r"LoRA adapter 'x': layer 1 o_proj is \(\d+, 4\) x \(4, 8\), the model needs"):
        LLM(qwen3_dir, dtype="float32", max_model_len=64, kv_cache_memory_mb=4, lora_modules={"x": str(d)})


@pytest.fixture(scope="module")
def served(qwen3_dir, adapters):
    """A single_node server with both adapters (and its OpenAI gateway)."""
    from baton.backends.serving.launcher import Node

    n = Node(str(qwen3_dir), "single_node", gateway_port=0,
             overrides={"dtype": "float32", "max_model_len": 256, "kv_cache_memory_mb": 4,
                        "lora_modules": {k: str(v) for k, v in adapters.items()}})
    n.start(timeout=180, quiet=True)
    yield n
    n.stop()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_streams_with_adapters_equal_the_offline_engine(served, llm, protocol):
    """Adapters and the base model streamed at the same time through Triton: each stream's tokens
    are the offline engine's for its adapter, and no KV block is left held."""
    import threading

    from conftest import blocks_in_use

    from baton_client import BatonClient

    prompt, names = "def fibonacci(n):", ["all", "", "some", "all"]
    tok = llm.engine.tokenizer
    expect = {n: llm.generate(tok.encode(prompt), GREEDY, lora=n)[0].token_ids for n in set(names)}
    url = served.grpc_url if protocol == "grpc" else served.http_url
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        c = BatonClient(url, protocol)
        got[i] = c.generate(prompt, temperature=0.0, max_tokens=12, ignore_eos=True, lora=names[i] or None).token_ids
        c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(len(names))] == [expect[n] for n in names]
    assert expect["all"] != expect[""] != expect["some"]
    assert blocks_in_use(served.manager.address) == 0


@pytest.mark.slow
def test_the_openai_gateway_takes_an_adapter_as_the_model(served, llm):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"http://{served.gateway_url}/v1", api_key="unused", max_retries=0)
    base = client.models.list().data[0].id
    assert [(m.id, getattr(m, "parent", None)) for m in client.models.list().data] == \
        [(base, None), ("all", base), ("some", base)]
    r = client.completions.create(model="some", prompt="class LRUCache:", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = llm.engine.tokenizer.encode("class LRUCache:")
    assert r.model == "some"
    assert r.choices[0].text == llm.engine.tokenizer.decode(
        llm.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), lora="some")[0].token_ids)
    with pytest.raises(NotFoundError, match="The model `nope` does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


@pytest.mark.slow
def test_a_served_request_naming_an_unknown_adapter_is_refused_naming_the_field(served):
    from baton_client import BatonClient, BatonError

    why = "lora: no LoRA adapter named 'nope'; this server has: all, some"
    with pytest.raises(BatonError, match=f"^HTTP 400: .*{why}"):
        BatonClient(served.http_url, "http").generate("x", max_tokens=2, lora="nope")
    c = BatonClient(served.grpc_url)
    with pytest.raises(BatonError, match=why):
        c.generate("x", max_tokens=2, lora="nope")
    assert c.generate("x", max_tokens=2, lora="all").completion_tokens == 2      # the server is fine
    c.close()


@pytest.mark.slow
def test_baton_serve_refuses_an_adapter_it_cannot_apply_in_one_line_before_starting(qwen3_dir, adapters, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    d = tmp_path / "dora"
    shutil.copytree(adapters["all"], d)
    conf = json.loads((d / "adapter_config.json").read_text()) | {"use_dora": True}
    (d / "adapter_config.json").write_text(json.dumps(conf))
    run_root = tmp_path / "runs"
    run_root.mkdir()
    r = subprocess.run([sys.executable, "-P", "-m", "baton.backends.cli", "serve", "--model", str(qwen3_dir),
                        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--gateway-port", "-1",
                        "--lora-modules", f"x={d}"], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"BATON_RUN_DIR": str(run_root)})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "baton serve: error: LoRA adapter 'x': DoRA is not supported"
    assert not any(run_root.iterdir())
