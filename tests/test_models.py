"""The committed baton-tiny family (models/): intact, loadable by transformers, scoring what
models/metrics.json recorded, and served by Baton's engine token for token like transformers."""

import hashlib
import json
import random

import pytest
import torch
from conftest import ROOT

MODELS = ROOT / "models"
TARGET = MODELS / "baton-tiny"
DRAFT = MODELS / "baton-tiny-draft"

pytestmark = pytest.mark.skipif(not (TARGET / "config.json").is_file(), reason="models/ not built")


@pytest.fixture(scope="module")
def report():
    return json.loads((MODELS / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TARGET))


def test_checksums_match():
    lines = (MODELS / "SHA256SUMS").read_text().split("\n")
    entries = [ln.split("  ", 1) for ln in lines if ln]
    assert {"baton-tiny/model.safetensors", "baton-tiny-draft/model.safetensors",
            "baton-tiny-medusa/model.safetensors", "baton-tiny-eagle/model.safetensors"} <= {p for _, p in entries}
    for digest, rel in entries:
        assert hashlib.sha256((MODELS / rel).read_bytes()).hexdigest() == digest, rel


def test_size_budget():
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total <= 60 * 2**20, f"models/ is {total / 2**20:.1f} MiB"


def test_shapes_as_asked(report):
    p = report["params"]
    assert 15e6 <= p["target"] <= 25e6 and 2e6 <= p["draft"] <= 5e6
    assert 8192 <= report["recipe"]["vocab"] <= 16384
    assert json.loads((MODELS / "baton-tiny-medusa" / "config.json").read_text())["medusa_num_heads"] in (3, 4)


@pytest.mark.parametrize("name,key", [("baton-tiny", "target_ppl"), ("baton-tiny-draft", "draft_ppl")])
def test_heldout_slice_perplexity_reproduces(report, tokenizer, name, key):
    from transformers import AutoModelForCausalLM

    from baton.tools.train.evaluate import perplexity
    from baton.tools.train.tiny import heldout_slice_windows

    s = report["metrics"]["slice"]
    windows = heldout_slice_windows(tokenizer, (MODELS / "heldout-slice.txt").read_text(encoding="utf-8"),
                                    s["seq_len"], s["windows"])
    assert len(windows) == s["windows"]
    model = AutoModelForCausalLM.from_pretrained(str(MODELS / name), dtype=torch.float32).eval()
    ppl = perplexity(model, windows)
    assert ppl == pytest.approx(s[key], rel=0.01)
    # and it is a trained model: far below the uniform guess over the vocabulary
    assert ppl < report["recipe"]["vocab"] / 20


def test_tokenizer_round_trips_any_utf8(tokenizer):
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x2FF), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    for _ in range(200):
        n = rng.randint(1, 40)
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))
        text = text.replace("\ud800", "")   # no lone surrogates in the ranges above, but be explicit
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    code = "def f(a ,b) :\r\n\treturn a . b  # ünïcödé 🚀\n"
    assert tokenizer.decode(tokenizer(code, add_special_tokens=False).input_ids) == code


def test_chat_template_renders(tokenizer):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nsort a list<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_draft_and_heads_predict_the_target(tokenizer):
    """Recomputed from the committed files on the held-out slice: the draft agrees with the target
    (the issue's goal: >= 55%), and the Medusa and EAGLE heads, loaded in their documented formats,
    guess the target's tokens far above chance (1/8192)."""
    from transformers import AutoModelForCausalLM

    from baton.backends.spec.heads import EagleHead, MedusaHeads
    from baton.tools.train.evaluate import family_metrics
    from baton.tools.train.tiny import heldout_slice_windows

    windows = heldout_slice_windows(tokenizer, (MODELS / "heldout-slice.txt").read_text(encoding="utf-8"), 512, 4)
    m = family_metrics(AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32).eval(),
                       AutoModelForCausalLM.from_pretrained(str(DRAFT), dtype=torch.float32).eval(),
                       MedusaHeads.load(MODELS / "baton-tiny-medusa").eval(),
                       EagleHead.load(MODELS / "baton-tiny-eagle").eval(), windows)
    assert m["draft_target_agreement"] >= 0.55
    assert m["medusa_top1_vs_target"][0] > 0.2
    assert m["eagle_top1_vs_target"] > m["medusa_top1_vs_target"][0]


def test_engine_greedy_matches_transformers_on_baton_tiny(tokenizer):
    from transformers import AutoModelForCausalLM

    from baton import LLM, SamplingParams

    prompts = ["def fibonacci(n):", "class LRUCache:\n    def __init__(self, capacity):"]
    model = AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32)
    expected = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0)
        expected.append(g[0, ids.shape[1]:].tolist())
    llm = LLM(str(TARGET), dtype="float32", num_blocks=64)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    finally:
        llm.close()
    assert [o.token_ids for o in outs] == expected
