"""Qwen2.5-VL: image preprocessing, the vision tower, M-RoPE and whole generations against
transformers' Qwen2_5_VLForConditionalGeneration on the random tiny checkpoint; the engine's
caching, chunking and batching with images; bad images."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baton.backends.engine.errors import InvalidRequestError
from baton.backends.engine.llm import LLM
from baton.backends.engine.sampling_params import SamplingParams

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def vl_dir(checkpoint):
    return checkpoint("tiny-qwen2.5-vl", dtype="float32")


@pytest.fixture(scope="module")
def hf(vl_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(vl_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(vl_dir)), Qwen2VLImageProcessorPil.from_pretrained(str(vl_dir))


def png(h: int, w: int, seed: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = PIL.fromarray((rng.random((h, w, 4 if mode == "RGBA" else 3)) * 255).astype(np.uint8),
                        "RGBA" if mode == "RGBA" else "RGB")
    if mode not in ("RGB", "RGBA"):
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def chat(tok, parts: list[str | None]) -> str:
    """A user turn of text parts and images (None), through the checkpoint's chat template."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def hf_generate(hf, parts: list[str | None], images: list[bytes], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their logprobs; the prompt expanded as Qwen2_5_VLProcessor does
    (its video half needs torchvision, which does not load here)."""
    model, tok, proc = hf
    text, kw = chat(tok, parts), {}
    if images:
        pv = proc(images=[PIL.open(io.BytesIO(b)) for b in images], return_tensors="pt")
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // 4) + p
                                   for g, p in zip(pv["image_grid_thw"], pieces[1:]))
        kw = dict(pv)
    ids = tok(text, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         mm_token_type_ids=(ids == model.config.image_token_id).int(), **kw, max_new_tokens=n,
                         do_sample=False, output_scores=True, return_dict_in_generate=True)
    toks = out.sequences[0, ids.shape[1]:].tolist()
    lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, toks)]
    return toks, lps


# ---- the parts, against transformers ---------------------------------------------------------

def test_image_preprocessing_is_transformers(vl_dir, hf):
    from baton.backends.multimodal.image import ImageProcessor

    ours, theirs = ImageProcessor.from_dir(vl_dir), hf[2]
    for i, (h, w, mode, fmt) in enumerate([(70, 100, "RGB", "PNG"), (300, 200, "RGBA", "PNG"),
                                           (33, 250, "L", "PNG"), (500, 900, "P", "PNG"),
                                           (120, 90, "RGB", "JPEG"), (64, 64, "RGB", "WEBP")]):
        raw = png(h, w, i, mode, fmt)
        ref = theirs(images=[PIL.open(io.BytesIO(raw))], return_tensors="np")
        got = ours(raw)
        assert list(got.grid) == ref["image_grid_thw"][0].tolist()
        assert np.array_equal(ours.patches(got), ref["pixel_values"]), (h, w, mode, fmt)
        assert np.array_equal(ours.patches(type(got)(got.data, got.grid, got.hash, got.num_tokens)),
                              ref["pixel_values"])        # from the bytes alone, as the encode stage makes them
        assert got.num_tokens == int(np.prod(got.grid)) // 4


def test_vision_tower_is_transformers(vl_dir, hf):
    from baton.backends.models.config import ModelConfig
    from baton.backends.models.vision import VisionConfig, VisionTower, load_vision_weights

    tower = VisionTower(VisionConfig.from_hf_dict(ModelConfig.from_dir(vl_dir).vision_config),
                        load_vision_weights(vl_dir, torch.float32))
    g = torch.Generator().manual_seed(0)
    # several windows per image, partial windows at the edges, two images in one call
    for grids in ([(1, 4, 8)], [(1, 10, 6), (1, 4, 4)], [(1, 12, 14)]):
        pixels = torch.randn(sum(t * h * w for t, h, w in grids), tower.cfg.patch_dim, generator=g)
        ref = hf[0].model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
        got = tower.forward(pixels, grids)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_tower_computes_in_fp32_where_the_cpu_has_no_bf16(vl_dir, native, monkeypatch):
    """Without native bf16 GEMMs (an AVX2 CPU) the tower runs on fp32 copies of its bf16 weights and
    rounds its embeddings to bf16 at the end; with them it stays in bf16."""
    from baton.backends.models import vision
    from baton.backends.models.config import ModelConfig

    monkeypatch.setattr(vision, "native_half_matmul", lambda dtype: native)
    cfg = vision.VisionConfig.from_hf_dict(ModelConfig.from_dir(vl_dir).vision_config)
    tower = vision.VisionTower(cfg, vision.load_vision_weights(vl_dir, torch.bfloat16))
    assert tower.dtype == (torch.bfloat16 if native else torch.float32)
    side = cfg.patch_size * cfg.spatial_merge_size
    assert tower.max_embedding_bytes(448 * 448) == 448 * 448 // side ** 2 * cfg.out_hidden_size * 2   # bf16 out
    grids = [(1, 4, 8)]
    pixels = torch.randn(32, cfg.patch_dim, generator=torch.Generator().manual_seed(0))
    got = tower.forward(pixels, grids)
    assert got.dtype == torch.bfloat16
    if not native:     # the fp32 tower on the same (bf16-valued) weights, rounded once
        ref = vision.VisionTower(cfg, {k: v.float() for k, v in tower.w.items()}).forward(pixels, grids)
        assert torch.equal(got, ref.to(torch.bfloat16))


def test_mrope_positions_are_transformers(vl_dir, hf):
    from baton.backends.multimodal.image import ImageProcessor
    from baton.backends.multimodal.prompt import expand_prompt

    model, tok, _ = hf
    images = [ImageProcessor.from_dir(vl_dir)(png(h, w, i)) for i, (h, w) in enumerate([(300, 120), (40, 260)])]
    ids = tok(chat(tok, ["a", None, "and", None, "compare"]))["input_ids"]
    expanded, mm = expand_prompt(ids, model.config.image_token_id, images, 2)
    t = torch.tensor([expanded])
    ref, delta = model.model.get_rope_index(t, (t == model.config.image_token_id).int(),
                                            torch.tensor([im.grid for im in images]))
    assert torch.equal(mm.positions, ref[:, 0])
    assert mm.delta == int(delta) < 0
    assert [s.length for s in mm.spans] == [im.num_tokens for im in images]


CASES = {
    "text only": (["Describe def foo():"], []),
    "one image": ([None, "What is this? import os"], [(70, 100)]),
    "two images of other shapes": (["a", None, "and", None, "compare"], [(300, 120), (40, 260)]),
    "square": ([None, "x"], [(200, 200)]),
}


@pytest.fixture(scope="module")
def llm(vl_dir):
    eng = LLM(vl_dir, dtype="float32", block_size=4)
    yield eng
    eng.close()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_token_exact_with_transformers(case, llm, hf):
    parts, shapes = CASES[case]
    images = [png(h, w, i) for i, (h, w) in enumerate(shapes)]
    want, want_lp = hf_generate(hf, parts, images, 12)
    out = llm.generate({"prompt": chat(hf[1], parts), "multi_modal_data": {"image": images}},
                       SamplingParams(max_tokens=12, temperature=0, logprobs=True))[0]
    assert out.token_ids == want
    np.testing.assert_allclose(out.logprobs, want_lp, atol=1e-4)


def test_images_change_the_output(llm, hf):
    """The image reaches the model: other pixels, other logits (and the same ones, the same: the
    second time from the prefix cache, so equal to rounding)."""
    prompt = chat(hf[1], [None, "What is this?"])
    sp = SamplingParams(max_tokens=4, temperature=0, logprobs=True)
    a, b, a2 = (llm.generate({"prompt": prompt, "multi_modal_data": {"image": png(90, 90, s)}}, sp)[0]
                for s in (1, 2, 1))
    assert a.token_ids == a2.token_ids and a2.num_cached_tokens > 0
    np.testing.assert_allclose(a.logprobs, a2.logprobs, atol=1e-5)
    assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() > 1e-3


def test_batching_chunking_and_prefix_cache_keep_outputs(vl_dir, hf):
    """Several image prompts in one batch, prefills cut into chunks mid-image, a repeated image hitting
    the prefix cache (and the embedding cache): the tokens of each request alone, unchunked."""
    tok = hf[1]
    reqs = [({"prompt": chat(tok, [None, f"q{i}"]), "multi_modal_data": {"image": png(60 + 30 * i, 90, i)}})
            for i in range(3)]
    reqs.append({"prompt": chat(tok, ["plain text"])})
    sp = SamplingParams(max_tokens=8, temperature=0)
    alone = LLM(vl_dir, dtype="float32", block_size=4, enable_prefix_caching=False)
    want = [alone.generate(r, sp)[0].token_ids for r in reqs]
    alone.close()
    eng = LLM(vl_dir, dtype="float32", block_size=4, max_num_batched_tokens=7)
    assert [o.token_ids for o in eng.generate(reqs, [sp] * len(reqs))] == want
    again = eng.generate(reqs[0], sp)[0]
    assert again.token_ids == want[0]
    assert again.num_cached_tokens >= 4 * ((len(again.prompt_token_ids) - 1) // 4) - 4
    enc = eng.engine.encoder
    assert enc.hits >= 1 and enc.misses == 3
    # the same text with another image shares only the blocks before the image
    other = eng.generate({"prompt": reqs[0]["prompt"], "multi_modal_data": {"image": png(60, 90, 99)}}, sp)[0]
    start = other.prompt_token_ids.index(eng.engine.config.image_token_id)
    assert other.num_cached_tokens <= start
    assert eng.engine.block_manager.num_used == 0
    eng.close()


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_images_are_clear_errors_and_leak_nothing(llm, hf, tmp_path):
    tok = hf[1]
    one = chat(tok, [None, "x"])
    good = png(50, 50, 0)
    bm = llm.engine.block_manager

    def err(prompt: str, images: list) -> str:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, SamplingParams(max_tokens=2))
        return str(e.value)

    assert "corrupt or truncated" in err(one, [good[: len(good) // 2]])
    assert "supported format" in err(one, [b"GIF89a-not-really" + b"\0" * 50])
    assert "supported format" in err(one, [png(20, 20, 1, fmt="TIFF")])
    assert "empty image" in err(one, [b""])
    assert "base64" in err(one, ["data:image/png;base64,@@@"])
    assert "not fetched" in err(one, ["https://example.com/cat.png"])
    assert "2 image(s) for 1 image placeholder(s)" in err(one, [good, good])
    assert "0 image(s) for 1" in err(one, [])
    assert "1 image(s) for 2" in err(chat(tok, [None, None]), [good])
    # an image whose header declares more pixels than the limit is refused before decoding
    big = io.BytesIO()
    PIL.new("1", (9000, 5000)).save(big, "PNG")
    assert "over the limit" in err(one, [big.getvalue()])
    assert bm.num_used == 0 and not llm.engine.requests
    # and the engine still serves
    assert llm.generate({"prompt": one, "multi_modal_data": {"image": good}}, SamplingParams(max_tokens=2))[0].token_ids


def test_images_to_a_text_model_are_refused(qwen3_dir):
    eng = LLM(qwen3_dir, dtype="float32")
    with pytest.raises(InvalidRequestError, match="does not take images"):
        eng.generate({"prompt": "hi", "multi_modal_data": {"image": png(30, 30, 0)}})
    eng.close()


def test_a_prompt_whose_embeddings_are_gone_ends_alone(llm, hf):
    """A decode node recomputing a preempted image prompt after its embedding cache let the image go:
    that request ends with an error naming why, the others in the step go on, no block is held."""
    from baton.backends.multimodal.prompt import MultiModalPrompt

    eng = llm.engine
    tok = hf[1]
    ok = eng.add_request(chat(tok, [None, "fine"]), SamplingParams(max_tokens=4, temperature=0),
                         images=[png(50, 50, 3)])
    ids, mm = eng.expand_images(tok(chat(tok, [None, "gone"]))["input_ids"], [png(50, 50, 4)])
    lost = MultiModalPrompt.of(mm.spans, len(ids), 2, fetch=lambda key: None)     # nothing in the store
    gone = eng.add_request(ids, SamplingParams(max_tokens=4, temperature=0), mm=lost)
    errors = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.error:
                errors[o.seq.request_id] = o.error
    assert list(errors) == [gone.request_id] and "image embeddings were no longer cached" in errors[gone.request_id]
    assert gone.finish_reason == "error" and ok.finish_reason == "length" and ok.num_output_tokens == 4
    assert eng.block_manager.num_used == 0


@pytest.mark.parametrize("method", ["ngram", "medusa"])
def test_speculation_with_images_is_token_exact_with_transformers(vl_dir, hf, method, tmp_path):
    """Drafts of image prompts are verified at their M-RoPE positions (generated tokens: the prompt's
    delta), in a batch with text and other images: greedy output stays transformers'. Medusa's heads
    here are random (none are trained for this model): drafts still get accepted and rejected."""
    spec: dict = {"method": method, "num_speculative_tokens": 3, "max_batch": 64, "adaptive": False}
    if method == "medusa":
        from baton.backends.models.config import ModelConfig
        from baton.backends.spec.heads import MedusaHeads

        cfg = ModelConfig.from_dir(vl_dir)
        torch.manual_seed(0)
        heads = MedusaHeads(cfg.hidden_size, 3, 1)
        for p in heads.parameters():
            torch.nn.init.normal_(p, std=0.05)
        heads.save(tmp_path, cfg.vocab_size, str(vl_dir))
        spec["model"] = str(tmp_path)
    cases = [CASES[c] for c in ("one image", "two images of other shapes", "text only")]
    images = [[png(h, w, i) for i, (h, w) in enumerate(shapes)] for _, shapes in cases]
    want = [hf_generate(hf, parts, ims, 24)[0] for (parts, _), ims in zip(cases, images)]
    llm = LLM(vl_dir, dtype="float32", block_size=4, speculative_config=spec)
    try:
        out = llm.generate([{"prompt": chat(hf[1], parts), "multi_modal_data": {"image": ims}}
                            for (parts, _), ims in zip(cases, images)],
                           SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        assert [o.token_ids for o in out] == want
        stats = llm.engine.spec_stats
        assert 0 < stats["accepted"] < stats["drafted"], stats
        assert llm.engine.block_manager.num_used == 0
    finally:
        llm.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's CUDA path needs a GPU")
def test_images_on_cuda_give_the_cpu_engine_tokens(vl_dir, hf, llm):
    """The CUDA engine (its tower on CPU, the embeddings spliced on the GPU, M-RoPE tables there)."""
    gpu = LLM(vl_dir, dtype="float32", block_size=4, device="cuda")
    for case in ("one image", "two images of other shapes"):
        parts, shapes = CASES[case]
        prompt = {"prompt": chat(hf[1], parts), "multi_modal_data": {"image": [png(h, w, i) for i, (h, w) in enumerate(shapes)]}}
        sp = SamplingParams(max_tokens=12, temperature=0)
        assert gpu.generate(prompt, sp)[0].token_ids == llm.generate(prompt, sp)[0].token_ids
    gpu.close()


def test_embedding_store_is_bounded_shared_and_whole(tmp_path):
    """The node's store: another process's client reads what the writer put; beyond its capacity the
    oldest use goes first; a read sees a whole embedding or none; keys are content hashes only."""
    from baton.backends.multimodal.embedding_store import EmbeddingStore

    writer = EmbeddingStore(tmp_path / "emb", capacity_bytes=3 * 64 * 16 * 2)     # three 64x16 bf16 embeddings
    reader = EmbeddingStore(tmp_path / "emb")
    g = torch.Generator().manual_seed(0)
    e = {f"{i:032x}": torch.randn(64, 16, generator=g).to(torch.bfloat16) for i in range(4)}
    keys = list(e)
    for k in keys[:3]:
        writer.put(k, e[k])
    assert torch.equal(reader.get(keys[0]), e[keys[0]])
    writer.get(keys[0])                                   # used: keys[1] is now the oldest
    writer.put(keys[3], e[keys[3]])
    assert reader.get(keys[1]) is None and len(reader) == 3
    assert all(torch.equal(reader.get(k), e[k]) for k in (keys[0], keys[2], keys[3]))
    assert sorted(p.suffix for p in (tmp_path / "emb").iterdir()) == [".emb"] * 3    # no temporary files
    with pytest.raises(ValueError, match="not a content hash"):
        reader.get("../../etc/passwd")
    # a file gone bad reads as missing (the request that wanted it is refused or re-read, never the
    # batch or the decode step failed) and is removed, so the encoder writes it again
    whole = (tmp_path / "emb" / f"{keys[0]}.emb").read_bytes()
    for bad in (b"garbage", whole[:-2]):
        (tmp_path / "emb" / f"{keys[0]}.emb").write_bytes(bad)
        assert reader.get(keys[0]) is None and not (tmp_path / "emb" / f"{keys[0]}.emb").exists()


def test_the_encode_stage_marks_cached_images_used_without_reading_them(vl_dir, tmp_path, monkeypatch):
    """ImageEncoder.ensure (the `encode` stage): a new image goes through the tower into the store; a
    cached one is neither encoded nor read, only marked used in the writer's LRU (so it outlives an
    older one), and counted as a hit."""
    from baton.backends.multimodal.embedding_store import EmbeddingStore
    from baton.backends.multimodal.encoder import ImageEncoder

    vision = json.loads((Path(vl_dir) / "config.json").read_text())["vision_config"]
    store = EmbeddingStore(tmp_path / "emb")
    enc = ImageEncoder.from_dir(vl_dir, vision, torch.float32, cache=store)
    a, b, c = (enc.processor(png(56, 56, i)) for i in range(3))
    enc.ensure([a, b])
    assert (enc.hits, enc.misses) == (0, 2)
    each = store.bytes // 2
    store.capacity = 2 * each                            # room for two
    monkeypatch.setattr(store, "get", lambda key: pytest.fail("a cached image was read"))
    enc.ensure([a])                                      # a: used again, b now the oldest
    assert (enc.hits, enc.misses) == (1, 2)
    enc.ensure([c])
    assert store.touch(a.hash) and store.touch(c.hash) and not store.touch(b.hash)
